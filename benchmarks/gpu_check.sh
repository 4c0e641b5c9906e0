#!/usr/bin/env bash
# polyport's cuda target on this machine's NVIDIA GPU: compile the five corpus exports, run them, compare
# logits with ONNX Runtime (CPU), time against ORT's CUDA EP; then generate greedily through the KV cache
# (tokens against the cpu target's; time per token against ORT's CUDA EP on the cache-less export, a full
# forward per token, as the table says). The work is benchmarks/gpu_check.py; this
# wrapper only prepares an offline environment (the GPU machines cannot download anything):
#
#   benchmarks/gpu_check.sh [WORK_DIR] [gpu_check.py options, e.g. --quick]
#
#   DTYPES="f32 bf16 f16"   run the check once per compute dtype (compile --dtype; artifacts M.cuda,
#                M.cuda.bf16, M.cuda.f16; JSON WORK/gpu_check.DTYPE.json; tolerance 1e-3 / 6.25e-2 / 2e-2 x max|ORT
#                logit|); the exit status is the worst run's. Default: f32 only (or pass --dtype yourself).
#   WHEELS=DIR   install every wheel in DIR first (pip --no-index --no-deps, into a private folder put
#                first on PYTHONPATH): apache-tvm, apache-tvm-ffi, onnxruntime-gpu, ... as the report asks.
#   PYTHON=...   the interpreter (default python3).
#
# WORK may be a bundle from benchmarks/gpu_bundle.sh: its artifacts are reused and its site/ (a
# runtime-only TVM and apache-tvm-ffi for Python 3.12) is put first on PYTHONPATH. That is the way onto
# this project's H200 machines: their image lacks TVM, and apache-tvm's wheel (~100 MB) is over what a
# call may carry (64 MiB). Without a bundle the machine needs apache-tvm==0.27.0.post1 and
# apache-tvm-ffi==0.1.14.post1 (WHEELS=DIR). Optional: onnxruntime-gpu built for CUDA 13 (the ORT CUDA EP
# column; without it the timing peer is ORT's CPU EP, and the report says why). The image already has
# nvcc, numpy, onnx, onnxruntime (CPU), click and ml-dtypes.
#
# polyport is imported from this checkout (a link named `polyport` to the repository root), so nothing
# needs installing. Exit status: gpu_check.py's (0 ok, 1 a numerics/compile/run failure, 2 cannot run).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="${1:-/tmp/polyport_gpu_check}"
[ $# -gt 0 ] && shift
mkdir -p "$WORK/site"
WORK="$(cd "$WORK" && pwd)"               # absolute: PYTHONPATH must survive the cd below
SITE="$WORK/site"

if [ -n "${WHEELS:-}" ]; then
    echo "gpu_check.sh: installing the wheels in $WHEELS into $SITE" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
fi
ln -sfn "$REPO" "$WORK/polyport"          # `import polyport` -> this checkout (the root is the package)
export PYTHONPATH="$SITE:$WORK${PYTHONPATH:+:$PYTHONPATH}"

# TVM's CUDA runtime links libcudart.so.13; where the toolkit or NVIDIA's wheels keep it may not be on the
# loader path. Missing libraries are reported by gpu_check.py, not guessed at here.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $("$PY" -c 'import nvidia, os; [print(os.path.join(p, d, "lib")) for p in nvidia.__path__ for d in os.listdir(p)]' 2>/dev/null || true); do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1

cd "$REPO"
if [ -z "${DTYPES:-}" ]; then
    exec "$PY" benchmarks/gpu_check.py --work-dir "$WORK" "$@"
fi
worst=0
for dt in $DTYPES; do
    echo "gpu_check.sh: --dtype $dt" >&2
    rc=0
    "$PY" benchmarks/gpu_check.py --work-dir "$WORK" --dtype "$dt" --json "$WORK/gpu_check.$dt.json" "$@" || rc=$?
    [ "$rc" -gt "$worst" ] && worst=$rc
done
exit "$worst"

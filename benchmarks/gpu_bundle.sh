#!/usr/bin/env bash
# Prepare here (full TVM, nvcc) what benchmarks/gpu_check.sh needs on a GPU machine that can neither
# download nor take the full TVM: apache-tvm's wheel is ~100 MB, 260 MB of it the compiler library,
# and this project's lent GPU machines take 64 MiB per call. The bundle holds
#   BUNDLE/artifacts/   the corpus compiled (gpu_check.py --compile-only; the run finds and reuses them)
#   BUNDLE/site/tvm     a runtime-only TVM: the installed package without libtvm_compiler.so and headers
#                       (TVM then loads its runtime alone; polyport's runtime never needs the compiler)
#   BUNDLE/site/tvm_ffi apache-tvm-ffi for the GPU machine's Python
#
#   benchmarks/gpu_bundle.sh BUNDLE [gpu_check.py options, e.g. --arch sm_90 --models llama_a]
#   ... carry BUNDLE.tar.xz to the GPU machine (inside the repository, git-ignored), then there:
#   tar xJf BUNDLE.tar.xz && benchmarks/gpu_check.sh BUNDLE --quick
# The tarball, not the folder: the repository's tracked files take ~35 MB of a call's 64 MiB, and the
# folder for the corpus in f32 and bf16 is ~55 MB (~14 MB as .tar.xz).
#
#   DTYPES="f32 bf16 f16"  compile the artifacts of each compute dtype (for gpu_check.sh's DTYPES; default f32)
#   TVM_FFI_WHEEL=FILE  that apache-tvm-ffi wheel (default: `pip download` of the installed version for
#                       Python $GPU_PYTHON, default 3.12, which needs the network here)
#   PYTHON=...          the interpreter here (default python)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
BUNDLE="${1:?usage: gpu_bundle.sh BUNDLE [gpu_check.py options]}"
shift
mkdir -p "$BUNDLE/site"

for dt in ${DTYPES:-f32}; do
    "$PY" "$REPO/benchmarks/gpu_check.py" --work-dir "$BUNDLE" --compile-only --dtype "$dt" "$@"
done

"$PY" - "$BUNDLE/site" <<'EOF'
import os, shutil, sys
import tvm
src = os.path.dirname(tvm.__file__)
dst = os.path.join(sys.argv[1], "tvm")
drop_top = {"3rdparty", "include", "src", "lib64"}          # headers and sources: compile-time only
def ignore(d, names):
    top = os.path.abspath(d) == os.path.abspath(src)
    return [n for n in names if n in ("libtvm_compiler.so", "__pycache__") or (top and n in drop_top)]
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst, ignore=ignore)
EOF

WHEEL="${TVM_FFI_WHEEL:-}"
if [ -z "$WHEEL" ]; then
    VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        -d "$BUNDLE/.wheels" "apache-tvm-ffi==$VERSION"
    WHEEL="$(ls "$BUNDLE"/.wheels/apache_tvm_ffi-"$VERSION"-*.whl | head -1)"
fi
rm -rf "$BUNDLE/site/tvm_ffi" "$BUNDLE"/site/apache_tvm_ffi-*.dist-info
"$PY" -m zipfile -e "$WHEEL" "$BUNDLE/site"          # a wheel is a zip of site-packages content
rm -rf "$BUNDLE/.wheels" "$BUNDLE/gpu_check.json" "$BUNDLE/polyport"
tar -cJf "$BUNDLE.tar.xz" -C "$(dirname "$BUNDLE")" "$(basename "$BUNDLE")"
echo "gpu_bundle: $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE, $(du -sh "$BUNDLE.tar.xz" | cut -f1) as $BUNDLE.tar.xz;" \
     "on the GPU machine: tar xJf $BUNDLE.tar.xz && benchmarks/gpu_check.sh $BUNDLE --quick" >&2

#!/usr/bin/env bash
# Install what the cuda and rocm targets need to build device code on a machine
# without GPUs (idempotent: installs only what is missing, says what it does).
#
#   rocm : Debian's rocm-device-libs (the AMDGPU bitcode TVM links in) and an
#          lld new enough for TVM's LLVM 22 code object v6 (lld >= 19; Debian
#          bookworm's default ld.lld is 14, which rejects it). lld-22 is taken
#          when the configured apt sources have it, else lld-19.
#   cuda : nvcc comes with the machine image (CUDA 13); cuobjdump, which the
#          tests use to list the kernels in each architecture's cubin, comes
#          from PyPI (nvidia-cuda-cuobjdump).
#
# Without apt (or without network) it warns and exits 0: the GPU build tests
# then skip and say which tool is missing, unless POLYPORT_REQUIRE_GPU_TOOLCHAINS=1.
set -uo pipefail

say() { printf 'install_gpu_toolchains: %s\n' "$*"; }

have_lld19plus() {
    local v
    for v in 22 21 20 19; do command -v "ld.lld-$v" >/dev/null 2>&1 && return 0; done
    return 1
}

apt_missing=()
dpkg -s rocm-device-libs >/dev/null 2>&1 || apt_missing+=(rocm-device-libs)
have_lld19plus || apt_missing+=(LLD)

if [ ${#apt_missing[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "apt-get is unavailable; missing: ${apt_missing[*]} (rocm builds will be skipped)"
    else
        say "apt-get update"
        apt-get update -qq || say "apt-get update failed"
        pkgs=()
        for p in "${apt_missing[@]}"; do
            if [ "$p" = LLD ]; then
                if apt-cache show lld-22 >/dev/null 2>&1; then pkgs+=(lld-22); else pkgs+=(lld-19); fi
            else
                pkgs+=("$p")
            fi
        done
        say "apt-get install ${pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
            || say "apt-get install ${pkgs[*]} failed (rocm builds will be skipped)"
    fi
else
    say "rocm-device-libs and lld >= 19 already installed"
fi

PY=${PYTHON:-python}
if command -v cuobjdump >/dev/null 2>&1 || "$PY" - <<'EOF' 2>/dev/null
import sys
from polyport.targets.device_code import find_cuobjdump
sys.exit(0 if find_cuobjdump() else 1)
EOF
then
    say "cuobjdump already available"
else
    say "pip install nvidia-cuda-cuobjdump"
    "$PY" -m pip install -q nvidia-cuda-cuobjdump || say "pip install nvidia-cuda-cuobjdump failed (cuda kernel listing will be skipped)"
fi
command -v nvcc >/dev/null 2>&1 || say "nvcc is not on PATH: cuda builds will be skipped (install the CUDA toolkit)"
exit 0

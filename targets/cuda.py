"""The cuda target: fused IR -> Relax/TIR -> dlight GPU schedules -> CUDA C++ -> nvcc fatbin, per arch.

A CUDA-less TVM build (the wheel here) stops at CUDA C++ source: its CUDA
module would be compiled by a CUDA-enabled runtime at load time, which then
needs NVRTC or nvcc. So at export the source is compiled here with nvcc into a
fatbin holding the sm_XX cubin plus compute_XX PTX (forward compatible), and
the packed module is rewritten to carry that fatbin (format "fatbin"): a
machine with the CUDA driver and a CUDA-enabled TVM runtime loads it without
any compiler. See targets/gpu_build.py for the files written and what is checked.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .. import errors
from .base import register_target
from .device_code import DeviceModule, library_bin_asm, library_bin_from_c, map_library_bin, parse_device_payload
from .gpu_build import GpuTarget


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (str(p) for p in [Path(os.environ.get("CUDA_PATH", "/usr/local/cuda")) / "bin" / "nvcc"] if p.is_file()), None)


def fatbin(source: str, arch: str, nvcc: str) -> bytes:
    """nvcc: `source` -> fatbin with the cubin for `arch` (sm_XX) and its PTX (compute_XX)."""
    from tvm.support import nvcc as tvm_nvcc
    num = arch[3:]
    gencode = ["-gencode", f"arch=compute_{num},code=sm_{num}", "-gencode", f"arch=compute_{num},code=compute_{num}"]
    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{env_path}"   # TVM's helper runs plain `nvcc`
    try:
        return bytes(tvm_nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))
    except RuntimeError as e:
        raise errors.PolyportError(f"cuda target ({arch}): nvcc failed on the generated kernels: "
                                   f"{str(e).strip()[-2000:]}") from None
    finally:
        os.environ["PATH"] = env_path


@register_target
class CudaTarget(GpuTarget):
    name = "cuda"
    default_archs = ("sm_80", "sm_90")
    known_archs = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_100a", "sm_120")

    def check_toolchain(self) -> dict[str, str]:
        nvcc = find_nvcc()
        if nvcc is None:
            raise errors.ToolchainError("cuda target: nvcc not found (on PATH or in $CUDA_PATH/bin); install the "
                                        "CUDA toolkit (CUDA 12.8+ for sm_100/sm_120)")
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        self._nvcc = nvcc
        return {"nvcc": m.group(2) if m else out.strip().splitlines()[-1]}

    def tvm_target(self, arch: str):
        import tvm
        return tvm.target.Target({"kind": "cuda", "arch": arch})

    def export(self, ex, target, path: Path) -> list[str]:
        from tvm.runtime import _ffi_api
        arch = target.attrs["arch"]
        kernels: list[str] = []

        def to_fatbin(kind: str, payload: bytes) -> bytes:
            if kind != "cuda":
                return payload
            dev = parse_device_payload(kind, payload)
            if dev.fmt != "cuda":          # a CUDA-enabled TVM already compiled it
                raise errors.PolyportError(f"cuda target ({arch}): TVM produced {dev.fmt!r} device code, "
                                           "expected CUDA source to compile with nvcc")
            with target:
                code = fatbin(dev.code.decode(), arch, self._nvcc)
            kernels.extend(dev.kernels)
            return DeviceModule(kind, "fatbin", dev.kernels, code, dev.fmap).payload()

        def pack_imports(mod, is_system_lib, prefix, workspace):
            symbol, blob = library_bin_from_c(_ffi_api.ModulePackImportsToC(mod, is_system_lib, prefix))
            blob_path = Path(workspace) / "devc.bin"
            blob_path.write_bytes(map_library_bin(blob, to_fatbin))
            asm = Path(workspace) / "devc.S"
            asm.write_text(library_bin_asm(symbol, blob_path))
            return str(asm)

        ex.mod.export_library(str(path), fpack_imports=pack_imports)
        if not kernels:
            raise errors.PolyportError(f"cuda target ({arch}): the built module holds no CUDA kernels")
        return sorted(kernels)

"""The rocm target: fused IR -> Relax/TIR -> dlight GPU schedules -> TVM's AMDGPU LLVM backend -> HSACO, per arch.

TVM compiles the kernels with its own LLVM (22), links in the ROCm device
libraries' bitcode and calls `tvm_callback_rocm_link` to link the object into
an HSA code object, which the exported library embeds (format "hsaco"): a
machine with a ROCm driver and a ROCm-enabled TVM runtime loads it without a
compiler. On this Debian machine:

- the bitcode comes from Debian's `rocm-device-libs`; TVM looks for it under
  `$ROCM_PATH/amdgcn/bitcode`, so ROCM_PATH is pointed, for the build only, at
  a cache folder holding an `amdgcn` link to Debian's folder;
- LLVM 22 emits code object v6, which lld 14 (Debian's default ld.lld) rejects:
  the link callback uses the newest `ld.lld-N` with N >= 19 (lld-22 from the
  install script).

See targets/gpu_build.py for the files written and what is checked.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .. import errors
from .base import register_target
from .gpu_build import GpuTarget

MIN_LLD = 19          # the first lld that links AMDGPU code object v6
INSTALL_HINT = "run scripts/install_gpu_toolchains.sh (apt-get install rocm-device-libs lld-22)"


def find_bitcode_dir() -> Path | None:
    """Debian's rocm-device-libs bitcode folder (…/amdgcn/bitcode), or an existing $ROCM_PATH's."""
    cands = [Path(os.environ["ROCM_PATH"]) / "amdgcn" / "bitcode"] if "ROCM_PATH" in os.environ else []
    cands += sorted(Path("/usr/lib").glob("*/amdgcn/bitcode")) + [Path("/opt/rocm/amdgcn/bitcode")]
    return next((c for c in cands if (c / "ocml.bc").is_file()), None)


def find_lld() -> str | None:
    """The newest ld.lld-N on PATH with N >= MIN_LLD (a plain `ld.lld` only if it reports such a version)."""
    for major in range(30, MIN_LLD - 1, -1):
        found = shutil.which(f"ld.lld-{major}")
        if found:
            return found
    plain = shutil.which("ld.lld")
    if plain:
        m = re.search(r"LLD (\d+)", subprocess.run([plain, "--version"], capture_output=True, text=True).stdout)
        if m and int(m.group(1)) >= MIN_LLD:
            return plain
    return None


def rocm_path_for(bitcode: Path) -> Path:
    """A cache folder usable as ROCM_PATH: `amdgcn` links to the folder above Debian's bitcode."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "polyport" / "rocm"
    link = root / "amdgcn"
    if not (link.is_symlink() and link.resolve() == bitcode.parent.resolve()):
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".amdgcn.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(bitcode.parent)
        os.replace(tmp, link)            # atomic: parallel compiles never see a half-made link
    return root


@contextlib.contextmanager
def rocm_toolchain(lld: str, rocm_path: Path):
    """For the build only: ROCM_PATH at the bitcode, and TVM's link callback using `lld`."""
    import tvm_ffi
    from tvm.support import rocm as tvm_rocm

    def link(obj: bytes) -> bytes:
        with tempfile.TemporaryDirectory() as d:
            obj_path, co_path = Path(d) / "kernels.o", Path(d) / "kernels.co"
            obj_path.write_bytes(bytes(obj))
            try:
                tvm_rocm.rocm_link(str(obj_path), str(co_path), lld=lld)
            except RuntimeError as e:
                raise errors.PolyportError(f"rocm target: {lld} failed to link the kernels: {e}") from None
            return bytearray(co_path.read_bytes())

    old_env = os.environ.get("ROCM_PATH")
    old_link = tvm_ffi.get_global_func("tvm_callback_rocm_link", allow_missing=True)
    os.environ["ROCM_PATH"] = str(rocm_path)
    tvm_ffi.register_global_func("tvm_callback_rocm_link", link, override=True)
    try:
        yield
    finally:
        if old_link is not None:
            tvm_ffi.register_global_func("tvm_callback_rocm_link", old_link, override=True)
        if old_env is None:
            os.environ.pop("ROCM_PATH", None)
        else:
            os.environ["ROCM_PATH"] = old_env


@register_target
class RocmTarget(GpuTarget):
    name = "rocm"
    default_archs = ("gfx90a", "gfx942")
    known_archs = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx1030", "gfx1100")

    def check_toolchain(self) -> dict[str, str]:
        bitcode = find_bitcode_dir()
        if bitcode is None:
            raise errors.ToolchainError("rocm target: the AMDGPU device-library bitcode (ocml.bc, …) was not found: "
                                        f"Debian package rocm-device-libs is missing; {INSTALL_HINT}")
        lld = find_lld()
        if lld is None:
            raise errors.ToolchainError(f"rocm target: no ld.lld >= {MIN_LLD} found (TVM's LLVM emits AMDGPU code "
                                        f"object v6, which Debian's default lld 14 rejects); {INSTALL_HINT}")
        import tvm
        self._lld, self._rocm_path = lld, rocm_path_for(bitcode)
        lld_version = subprocess.run([lld, "--version"], capture_output=True, text=True).stdout.strip()
        return {"llvm": str(tvm.target.codegen.llvm_version_major()), "lld": lld_version,
                "device_libs": str(bitcode)}

    def tvm_target(self, arch: str):
        import tvm
        return tvm.target.Target({"kind": "rocm", "mcpu": arch})

    def build(self, mod, target):
        import tvm
        with rocm_toolchain(self._lld, self._rocm_path):
            return tvm.compile(mod, target=target)

    def export(self, ex, target, path: Path) -> list[str]:
        from .device_code import device_modules, library_bin_from_so
        ex.export_library(str(path))
        mods = device_modules(library_bin_from_so(path), ("hip",))   # TVM names the ROCm module kind "hip"
        if not mods or mods[0].fmt != "hsaco":
            raise errors.PolyportError(f"rocm target ({target.attrs['mcpu']}): the exported library holds no HSACO "
                                       f"code object (found: {[m.fmt for m in mods]})")
        return sorted(k for m in mods for k in m.kernels)

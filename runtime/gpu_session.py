"""Loader for the cuda and rocm targets: the Relax VM over the library built for this GPU's architecture.

The artifact holds one library per architecture (`T/<arch>/model.so`, the VM
executable with its device code embedded: cubin/fatbin for sm_XY, HSACO for
gfxNNN) and one `T/model.json`; the manifest entry lists them:

    {"archs": ["sm_80", "sm_90"], "libraries": {"sm_90": "cuda/sm_90/model.so", ...},
     "meta": "cuda/model.json", ...}

Loading checks, in order, that TVM's runtime was built with the device kind
and could load it (the pip wheel's CUDA runtime needs the NVIDIA driver's
libcuda.so.1), that device 0 exists, and that a library matches its
architecture (`select_arch`, a pure function); each failure is one clear
error naming the target, the device and the architectures built. Weights are
uploaded to the device once, at load.

Generation (runtime/generation.py): when the entry lists `"programs": ["prefill", "decode"]`, the
library holds those VM functions and the session decodes through the KV cache, kept in device
buffers that the programs update in place (vm_session.py); otherwise it recomputes, with a warning.
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .. import errors
from .artifact import Artifact, ArtifactError
from .generation import Generator
from .vm_session import VmSession, first_line

VENDOR = {"cuda": "CUDA", "rocm": "ROCm"}
_SM = re.compile(r"^sm_(\d+)(\d)([af]?)$")     # sm_90, sm_120, sm_90a (arch-specific), sm_100f (family)
_GCN_ARCH = 10                                  # DeviceAttrKind::kGcnArch in TVM's device_api.h
_SIDECARS: dict[str, Any] = {}                  # device-kind libraries loaded here (kept loaded)


# ---- which library runs on which device (pure) -------------------------------------------
def _sm(arch: str) -> tuple[int, int, str]:
    m = _SM.match(arch)
    if m is None:
        raise errors.PolyportError(f"target cuda: {arch!r} is not a CUDA architecture (sm_XY)")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def select_arch(target: str, built: Sequence[str], device_arch: str) -> str:
    """The built architecture whose library runs on a device of `device_arch`.

    cuda: the exact sm_XY (sm_XYa also fits exactly); else the highest built
    sm_XZ of the same major with Z <= Y, since a cubin runs on later minors of
    its major (an `a` cubin runs on its exact architecture only). rocm: the
    exact gfx name (HSACO is not portable across gfx targets); feature suffixes
    (`gfx90a:sramecc+:xnack-`) are ignored."""
    if target == "cuda":
        major, minor, _ = _sm(device_arch)
        exact = [a for a in built if _sm(a)[:2] == (major, minor)]
        if exact:
            return sorted(exact, key=lambda a: _sm(a)[2] != "")[0]     # prefer plain sm_XY over sm_XYa/f
        older = [a for a in built if _sm(a)[0] == major and _sm(a)[1] < minor and _sm(a)[2] != "a"]
        if older:
            return max(older, key=lambda a: _sm(a)[1])
        why = "a cubin runs only on its own major version, at the same or a later minor"
    elif target == "rocm":
        name = device_arch.split(":", 1)[0]
        for a in built:
            if a.split(":", 1)[0] == name:
                return a
        why = "HSACO code objects run only on the gfx architecture they were built for"
    else:
        raise errors.PolyportError(f"target {target!r} is not a GPU target (cuda | rocm)")
    raise errors.PolyportError(f"target {target}: this device is {device_arch} but the artifact holds device code "
                               f"only for {', '.join(built) or 'no architecture'} ({why}); recompile with "
                               f"`polyport compile MODEL --target {target} --arch {device_arch.split(':', 1)[0]}`")


def cuda_arch(compute_version: str) -> str:
    """'9.0' (TVM's Device.compute_version) -> 'sm_90'."""
    major, _, minor = str(compute_version).partition(".")
    return f"sm_{int(major)}{int(minor or 0)}"


def rocm_arch(gcn_arch: Any, compute_version: Optional[str] = None) -> str:
    """TVM's ROCm kGcnArch attribute -> a gfx name.

    Newer runtimes give the name itself ('gfx942:sramecc+:xnack-'); TVM's ROCm
    runtime gives HIP's `gcnArch` integer, major*100 + minor*10 + stepping,
    with the stepping a hex digit (gfx90a -> 910), which the compute version
    (major.minor) disambiguates."""
    text = str(gcn_arch).strip()
    if text.startswith("gfx"):
        return text.split(":", 1)[0]
    n = int(text)
    if compute_version:
        major, _, minor = str(compute_version).partition(".")
        stepping = n - int(major) * 100 - int(minor or 0) * 10
        if 0 <= stepping < 16:
            return f"gfx{int(major)}{int(minor or 0)}{stepping:x}"
    return f"gfx{n}"


# ---- what this machine has ----------------------------------------------------------------
def _runtime_problem(target: str) -> Optional[str]:
    """Why TVM's runtime cannot drive `target` devices here, or None."""
    import tvm
    if tvm.runtime.enabled(target):
        return None
    # TVM 0.27 loads each device kind from a sidecar library next to libtvm_runtime.so on import, silently
    # skipping one that fails, and not at all in runtime-only mode (no libtvm_compiler.so, or
    # TVM_USE_RUNTIME_LIB=1; tvm/backend/_autoload_backends.py). Load it here: that enables the device
    # kind (its registrations run on load) or says why it cannot.
    runtime = getattr(tvm.base, "_LOADED_LIBS", {}).get("tvm_runtime")
    if runtime is None:
        return f"TVM's {VENDOR[target]} runtime is not enabled in this TVM ({tvm.__version__})"
    sidecar = Path(runtime._name).resolve().parent / f"libtvm_runtime_{target}.so"
    if not sidecar.exists():
        return f"this TVM ({tvm.__version__}) was built without {VENDOR[target]} support (no {sidecar.name})"
    try:
        _SIDECARS[target] = ctypes.CDLL(str(sidecar))
    except OSError as e:
        return f"TVM's {VENDOR[target]} runtime ({sidecar.name}) does not load: {e}"
    return None if tvm.runtime.enabled(target) else f"TVM's {VENDOR[target]} runtime is not enabled"


def device_problem(target: str, device_id: int = 0) -> Optional[str]:
    """Why `target` cannot run on this machine (no runtime support, no device), or None when it can."""
    problem = _runtime_problem(target)
    if problem is None:
        import tvm
        if not getattr(tvm, target)(device_id).exist:
            which = f"device {device_id}" if device_id else "device"
            return f"no {VENDOR[target]} {which} is visible to TVM on this machine"
        return None
    return f"no {VENDOR[target]} device is visible to TVM on this machine ({problem})"


def open_device(target: str, device_id: int = 0) -> tuple[Any, str, str]:
    """(TVM device, its name, its architecture in the manifest's spelling) of a present device."""
    import tvm
    dev = getattr(tvm, target)(device_id)
    if target == "cuda":
        arch = cuda_arch(dev.compute_version)
    else:
        arch = rocm_arch(dev._GetDeviceAttr(dev.dlpack_device_type(), dev.index, _GCN_ARCH), dev.compute_version)
    return dev, str(dev.device_name), arch


# ---- the session --------------------------------------------------------------------------
class GpuSession(VmSession, Generator):
    def __init__(self, art: Artifact, entry: Mapping[str, Any], target: str, device_id: int = 0):
        built = list(entry.get("archs", ()))
        libraries = entry.get("libraries", {})
        if not built or not libraries:
            raise ArtifactError(f"{art.path}: the {target} entry of the manifest lists no archs/libraries; "
                                "recompile the artifact")
        holds = f"this artifact holds device code for {', '.join(built)}"
        problem = device_problem(target, device_id)
        if problem is not None:
            raise errors.PolyportError(f"target {target}: {problem}; {holds}")
        dev, self.device_name, device_arch = open_device(target, device_id)
        self.arch = select_arch(target, built, device_arch)
        if self.arch not in libraries:
            raise ArtifactError(f"{art.path}: the {target} entry lists arch {self.arch} but no library for it")
        self.entry = dict(entry)
        try:
            super().__init__(art, target, libraries[self.arch], entry.get("meta", f"{target}/model.json"), dev)
        except errors.PolyportError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory while uploading weights
            raise errors.PolyportError(f"target {target}: loading {libraries[self.arch]} on {self.device_name} "
                                       f"failed: {first_line(e)}") from e


def load(art: Artifact, entry: Mapping[str, Any], target: str, device_id: int = 0) -> GpuSession:
    return GpuSession(art, entry, target, device_id=device_id)

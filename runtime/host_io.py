"""Feeds into and results out of a Relax VM call, with as few copies as are safe.

On the host a NumPy feed is handed to the VM by DLPack, without a copy (the VM's functions are pure:
they never write a feed), and a result the build found fresh is a NumPy view of the VM's buffer (any
other, one NumPy copy). `tvm.runtime.tensor(x)` and `Tensor.numpy()`, used before, cost ~50 us each
around a 0.6 ms deepseek_v3_a prefill, far more than their bytes. TVM's kernels may assume 64-byte
aligned buffers (vector loads), so a feed that is not aligned, not writeable (DLPack cannot say
read-only), not strictly row-major or of a dtype DLPack lacks is first copied into an aligned buffer.
On any other device the feeds are uploaded and the results copied back.
"""
from __future__ import annotations

from typing import Any, Container, Sequence

import numpy as np

ALIGN = 64      # bytes: what TVM assumes of a buffer's data pointer
_HOST = 1       # DLPack's kDLCPU


def is_host(device: Any) -> bool:
    return device.dlpack_device_type() == _HOST


def _aligned_copy(x: np.ndarray) -> np.ndarray:
    buf = np.empty(x.nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    out = buf[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def to_device(x: np.ndarray, device: Any) -> Any:
    """`x` (C-contiguous) as a VM argument on `device`."""
    import tvm
    if not is_host(device) or not x.size:     # an empty array: NumPy gives it any strides, TVM checks them
        return tvm.runtime.tensor(x, device=device)
    if x.ctypes.data % ALIGN or not x.flags.writeable or not _compact(x):
        x = _aligned_copy(x)
    shared = host_view(x)
    return tvm.runtime.tensor(x, device=device) if shared is None else shared


def host_view(x: np.ndarray) -> Any:
    """A TVM tensor over x's own memory (DLPack, no copy), or None for a dtype DLPack cannot carry
    (bfloat16). x must be aligned, writeable and row-major (to_device's checks)."""
    from tvm_ffi import from_dlpack
    try:
        return from_dlpack(x)
    except (BufferError, TypeError, ValueError, RuntimeError):
        return None


def _compact(x: np.ndarray) -> bool:
    """Row-major strides exactly: NumPy calls an array with a size-1 axis of any stride C-contiguous,
    TVM does not."""
    step = x.itemsize
    for n, stride in zip(reversed(x.shape), reversed(x.strides)):
        if stride != step:
            return False
        step *= n
    return True


def to_host(outs: Sequence[Any], device: Any, fresh: Container[int] = ()) -> list[np.ndarray]:
    """The VM's results as NumPy arrays the caller owns. `fresh`: the indices of results the build
    found in buffers of their own (targets/fresh_outputs.py); on the host those come back as NumPy
    views of the VM's buffer (kept alive by the view), the others as one NumPy copy, since they may be
    the very buffer of a weight, a constant or a feed, which writing a result must never change."""
    if not is_host(device):
        return [o.numpy() for o in outs]
    arrays = []
    for i, o in enumerate(outs):
        try:
            view = np.from_dlpack(o)
        except (BufferError, TypeError, ValueError, RuntimeError):     # a dtype NumPy cannot import
            arrays.append(o.numpy())
            continue
        arrays.append(view if i in fresh else view.copy())
    return arrays

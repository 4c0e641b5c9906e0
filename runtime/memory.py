"""Refuse a call whose inputs and outputs alone cannot fit in this machine's memory, before allocating.

`polyport run ART --seq 10000000` would otherwise start a run that the kernel
kills (or that swaps the machine to a halt) minutes later. The bound is exact
but low: the signature's input and output tensors at the call's symbol values,
which must all exist at once; intermediates are not counted.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from .. import errors
from ..ir.types import TensorType


def available_bytes() -> Optional[int]:
    """Memory this process may still take: MemAvailable, lowered by a cgroup (v2) limit; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def tensor_bytes(types: Sequence[tuple[str, Any]], bindings: Mapping[str, int]) -> int:
    total = 0
    for _, t in types:
        if not isinstance(t, TensorType) or t.shape is None or t.dtype is None or t.dtype.numpy is None:
            continue
        n = t.dtype.numpy.itemsize
        for d in t.shape:
            try:
                n *= d if isinstance(d, int) else d.evaluate(bindings)
            except (AttributeError, KeyError):
                n = 0
        total += max(n, 0)
    return total


# Below this the check reads no /proc file: that cost 38 us a call, 8% of a 128-token prefill of a small
# export, and a call this size is not the runaway the check is for.
UNCHECKED_BYTES = 64 << 20


def check_fits(target: str, types: Sequence[tuple[str, Any]], bindings: Mapping[str, int]) -> None:
    """Raise ResourceError when the tensors `types` (inputs and outputs) at `bindings` exceed free memory."""
    need = tensor_bytes(types, bindings)
    if need < UNCHECKED_BYTES:
        return
    free = available_bytes()
    if free is not None and need > free:
        at = ", ".join(f"{s} = {v}" for s, v in sorted(bindings.items()))
        raise errors.ResourceError(f"{target}: at {at} the inputs and outputs alone need {need / 2**30:.1f} GiB, "
                                   f"this machine has {free / 2**30:.1f} GiB available; use a shorter input")

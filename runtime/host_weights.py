"""A host session's weights in one mapping the kernel may back with 2 MiB pages.

A decode step streams every weight from DRAM once. TVM's allocator (posix_memalign) leaves a large
buffer on 4 KiB pages wherever transparent huge pages are enabled for "madvise" only (as on the
AVX2 EPYC measured below), so the GEMVs walk a page-table entry, and the hardware prefetcher stops,
every 4 KiB. Measured on a 2-vCPU AMD EPYC (Zen 3), weights from DRAM: the LM head GEMV (K 1536,
N 32000) 6.5-7.0 ms on 4 KiB pages, 5.6-5.7 ms on 2 MiB pages; llama_500m's whole decode step, the
two sessions alternated step by step in one process, 3% faster (a median ratio of 1.03 over 40
steps: most of its GEMVs already ran near the bandwidth). So the weights are copied once into
one anonymous mapping advised MADV_HUGEPAGE and handed to the VM by DLPack: no second copy, and the
mapping lives as long as any weight does. Where the advice is unknown (not Linux) or huge pages are
off, it is the same memory on 4 KiB pages as before.
"""
from __future__ import annotations

import mmap
from typing import Any, Callable, Iterable, Mapping

import numpy as np

HUGE_PAGE = 2 << 20     # bytes: x86-64's transparent huge page; the mapping starts on one
ALIGN = 4096            # bytes between weights: whole pages (TVM needs 64)


def _advised(nbytes: int) -> np.ndarray:
    """A zeroed, writeable uint8 array of `nbytes` at a HUGE_PAGE boundary, advised MADV_HUGEPAGE."""
    if not hasattr(mmap, "MAP_PRIVATE"):        # not a POSIX mmap: aligned NumPy memory, no advice
        buf = np.zeros(nbytes + HUGE_PAGE, np.uint8)
        return buf[-buf.ctypes.data % HUGE_PAGE:][:nbytes]
    # private: a shared anonymous mapping is shmem, whose huge pages another switch governs (shmem_enabled)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice)
        except OSError:         # a kernel without transparent huge pages: 4 KiB pages, as TVM's
            pass
    buf = np.frombuffer(region, np.uint8)
    start = -buf.ctypes.data % HUGE_PAGE
    return buf[start:start + nbytes]


def host_tensors(names: Iterable[str], weights: Mapping[str, np.ndarray],
                 prepare: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, Any]:
    """{name: TVM tensor on the host}: prepare(name, weights[name]) copied into one huge-page-advised
    mapping, one weight at a time (a packed layout is written straight from its view). The mapping is
    sized by the stored weights; a prepared array that is larger, empty, or of a dtype DLPack cannot
    carry (bfloat16) gets a TVM tensor of its own (its share of the mapping is never touched, so never
    backed by memory)."""
    import tvm
    from .host_io import host_view
    names = list(names)
    slots = {n: -(-weights[n].nbytes // ALIGN) * ALIGN for n in names}
    arena = _advised(max(1, sum(slots.values())))
    out, offset = {}, 0
    for name in names:
        a = prepare(name, weights[name])
        tensor = None
        if 0 < a.nbytes <= slots[name]:     # NumPy gives an empty array any strides, TVM checks them
            view = arena[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape)
            tensor = host_view(view)
        offset += slots[name]
        if tensor is None:
            out[name] = tvm.runtime.tensor(np.ascontiguousarray(a), device=tvm.cpu())
            continue
        view[...] = a
        out[name] = tensor
    return out

"""Software prefetch for kernels that stream weights from memory at one or a few rows (decode GEMVs).

One core's GEMV over weights that come from DRAM read about 7 GB/s on this host's Emerald Rapids cores,
where a read-only loop reaches 15-18 GB/s: the hardware prefetcher does not run far enough ahead of a
loop that also decodes (or multiplies) what it reads. Asking for each cache line PREFETCH_BYTES ahead
of its use (prefetcht0) closes most of that gap: a K = 1024, N = 4096 int4 GEMV from DRAM on 2 threads
0.19-0.23 ms without, 0.16 at 1 KB ahead, 0.12 at 4 KB and 8 KB; in cache it changes nothing measurable.
"""
from __future__ import annotations

from tvm.script import tirx as T

PREFETCH_BYTES = 4096
LINE_BYTES = 64


def prefetch(element, level: int = 1):
    """Ask for the cache line holding buffer element `element` (a BufferLoad; an index past the buffer
    end is harmless: a prefetch never faults) into cache `level`: 1 (prefetcht0) for what the next
    iterations read, 2 (prefetcht1) for what a later tile reads, so it does not evict this one's lines."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(element), T.int32(0),
                                         T.int32(4 - level), T.int32(1)))

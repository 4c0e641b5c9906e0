"""Which cache rows a CacheUpdate writes and which keys a CachedAttention query sees (ir/fused/cache.py's
meaning), as TIR expressions shared by the cpu and portable kernels, so the two sets cannot disagree.

Positions are absolute token positions; C is the cache's capacity. A ring keeps position p in slot p % C."""
from __future__ import annotations

from tvm import tirx


def _i64(x: int):
    return tirx.IntImm("int64", x)


def written(i, n, C, ring: bool):
    """Row i of the n real new rows is written: all of them (linear cache), the last C (ring)."""
    return tirx.all(i < n, i >= n - C) if ring else i < n


def slot(p, C, ring: bool):
    """The cache slot of position p."""
    return tirx.floormod(p, C) if ring else p


def first_cached(past, i, C, window: int, ring: bool):
    """The first cached position that query i (at position past + i) may see."""
    lo = _i64(0)
    if window:
        lo = tirx.max(lo, past + i - _i64(window - 1))
    if ring:
        lo = tirx.max(lo, past - C)
    return lo


def first_new(i, window: int):
    """The first of this step's new keys that query i may see."""
    return tirx.max(_i64(0), i - _i64(window - 1)) if window else _i64(0)

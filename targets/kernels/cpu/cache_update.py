"""`polyport::CacheUpdate` in place: the new K/V rows written into the cache buffer itself.

The lowering calls this with `call_tir_inplace` (the cache is the output), so a decode step writes
only its k new rows per sequence and never copies the cache. Linear: row i of sequence b goes to
slot past_len[b] + i (rows past the capacity are dropped rather than written out of bounds: the
runtime refuses such lengths before). Ring: position p lives in slot p % C, and only the last C
real rows are written. Rows i >= n_new[b] (right padding of a batched prefill) are not written.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ..memo import cached_kernel
from ..cache_rules import slot, written


@cached_kernel
def cache_update_func(*, kv_heads: int, d: int, ring: bool, dtype: str = "float32"):
    """PrimFunc cache_update(cache [B, KV, C, D], new [B, KV, S, D], past_len [B], n_new [B]),
    writing into `cache`; B, C, S symbolic."""
    KV, D = kv_heads, d

    @T.prim_func(private=True)
    def cache_update(c_h: T.handle, n_h: T.handle, p_h: T.handle, k_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        C = T.int64()
        S = T.int64()
        CA = T.match_buffer(c_h, (B, KV, C, D), dtype)
        NW = T.match_buffer(n_h, (B, KV, S, D), dtype)
        PL = T.match_buffer(p_h, (B,), "int64")
        NN = T.match_buffer(k_h, (B,), "int64")
        for b, g, i in T.grid(B, T.int64(KV), S):
            if written(i, NN[b], C, ring) and slot(PL[b] + i, C, ring) < C:
                for c in T.vectorized(T.int64(D)):
                    CA[b, g, slot(PL[b] + i, C, ring), c] = NW[b, g, i, c]

    return cache_update

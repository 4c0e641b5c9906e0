"""`polyport::CacheUpdate` in place, as a GPU kernel: one thread block per new row (b, kv head, i),
its threads over the head dim. Same meaning as kernels/cpu/cache_update.py (linear: row i at slot
past_len[b] + i; ring: slot (past_len[b] + i) % C, the last C real rows only; rows i >= n_new[b],
right padding, unwritten). Threads write disjoint elements, so with the loops serial (`gpu=False`)
the function computes what the GPU build does; that is what the CPU check runs."""
from __future__ import annotations

from tvm.script import tirx as T

from ..memo import cached_kernel
from .cached_attention import loop
from ..cache_rules import slot, written

MAX_TX = 256


@cached_kernel
def cache_update_func(*, kv_heads: int, d: int, ring: bool, gpu: bool, dtype: str = "float32"):
    """PrimFunc cache_update(cache [B, KV, C, D], new [B, KV, S, D], past_len [B], n_new [B]), writing
    into `cache`; B, C, S symbolic."""
    KV, D = kv_heads, d
    TX = min(D, MAX_TX)
    bind = loop(gpu)

    @T.prim_func(private=True)
    def cache_update(c_h: T.handle, n_h: T.handle, p_h: T.handle, k_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        C = T.int64()
        S = T.int64()
        CA = T.match_buffer(c_h, (B, KV, C, D), dtype)
        NW = T.match_buffer(n_h, (B, KV, S, D), dtype)
        PL = T.match_buffer(p_h, (B,), "int64")
        NN = T.match_buffer(k_h, (B,), "int64")
        for row in bind(B * T.int64(KV) * S, "blockIdx.x"):
            for tx in bind(T.int64(TX), "threadIdx.x"):
                b = row // (T.int64(KV) * S)
                g = row // S % T.int64(KV)
                i = row % S
                if written(i, NN[b], C, ring) and slot(PL[b] + i, C, ring) < C:
                    for cc in range(T.int64((D + TX - 1) // TX)):
                        if cc * T.int64(TX) + tx < T.int64(D):
                            CA[b, g, slot(PL[b] + i, C, ring), cc * T.int64(TX) + tx] = \
                                NW[b, g, i, cc * T.int64(TX) + tx]

    return cache_update

"""Attention in BHSD layout as one hand-scheduled TIR function (flash-style, one query row per task).

- GQA by indexing kv head h // group (K/V never repeated).
- K is copied once per call into key blocks of JB ([B, KV, Skv/JB, D, JB], zero-padded),
  so the q.k loop is JB-wide FMAs over contiguous keys.
- Causal / sliding-window rows visit only the key blocks that hold visible keys (loop
  bounds from the row's position); the two partial edge blocks are masked by select.
- Online softmax per row (running max m, denominator l, accumulator acc[Dv]): no
  [S, Skv] intermediate; exp is fastmath.exp (vectorised, exact 0 for -inf).
- `softcap` c: each score becomes c * tanh(s / c) before any mask (fastmath.tanh).
- A sink starts the row as one extra logit (m = sink, l = 1) that adds no value.
- A query that sees no key (l == 0) outputs zeros.
(batch, head) tasks run in parallel when the work is big enough (parallel.py).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from . import fastmath
from .parallel import PARALLEL_MIN_MACS

JB = 32     # keys per block: four AVX2 float32 vectors, so the q.k FMAs have independent chains


def attention_func(*, num_heads: int, kv_heads: int, d: int, dv: int, scale: float, causal: bool, window: int,
                   mask_shape=None, mask_dtype: str = "float32", sinks: bool = False, sinks_dtype: str = "float32",
                   dtype: str = "float32", softcap: float = 0.0):
    """The PrimFunc attention(q, k, v, mask, sinks, out) for these static sizes and options.

    q [B, H, S, D], k [B, KV, Skv, D], v [B, KV, Skv, Dv] (B, S, Skv symbolic). `mask_shape`: the
    explicit mask's shape, right-aligned to [B, H, S, Skv], 1 where it broadcasts (any other entry
    is bound at call time); None: no mask. Absent mask / sinks are still parameters (the caller
    passes a one-element placeholder) so that one signature serves every variant."""
    H, KV, D, DV = num_heads, kv_heads, d, dv
    GROUP = H // KV
    has_mask = mask_shape is not None
    mshape = [tirx.IntImm("int64", 1) if x == 1 else tirx.Var(f"m{n}", "int64")
              for n, x in enumerate(mask_shape or [1])]
    U = max(1, min(4, 64 // DV))      # P.V accumulator rows: enough independent FMA chains, <= 8 ymm
    ninf = tirx.const(float("-inf"), "float32")
    zero = tirx.const(0.0, "float32")

    def key_range(pos, skv):
        """[lo, hi): the keys query position `pos` may see."""
        hi = tirx.min(skv, pos + 1) if causal else skv
        lo = tirx.max(tirx.IntImm("int64", 0), pos - window + 1) if window else tirx.IntImm("int64", 0)
        return lo, hi

    def blocks(n):
        """ceil(n / JB), inlined (a let-bound extent cannot size a buffer)"""
        return (n + JB - 1) // JB

    def sum_rows(acc, c):
        total = acc[0, c]
        for u in range(1, U):
            total = total + acc[u, c]
        return total

    def score(M, s, b, h, i, j, lo, hi, skv):
        s = fastmath.soft_cap(s, softcap)
        keep = tirx.all(j >= lo, j < hi)
        if has_mask:
            idx = [b, h, i, tirx.min(j, skv - 1)][4 - len(mshape):]
            mv = M[tuple(tirx.IntImm("int64", 0) if isinstance(x, tirx.IntImm) else y for x, y in zip(mshape, idx))]
            if mask_dtype == "bool":
                keep = tirx.all(keep, mv)
            else:
                s = s + mv.astype("float32")
        return tirx.Select(keep, s, ninf)

    @T.macro
    def copy_k(K, KT, Skv, bg):
        for kb, c in T.grid(blocks(Skv), T.int64(D)):
            for jj in T.vectorized(T.int64(JB)):
                KT[bg // KV, bg % KV, kb, c, jj] = T.if_then_else(
                    kb * T.int64(JB) + jj < Skv,
                    T.Cast("float32", K[bg // KV, bg % KV, T.min(kb * T.int64(JB) + jj, Skv - 1), c]), zero)

    @T.macro
    def head(Q, KT, V, M, SK, O, S, Skv, bh):
        # per-task scratch, allocated once per (batch, head): an allocation inside the row
        # loop costs a TVMBackendAllocWorkspace call per row
        qs = T.alloc_buffer((D,), "float32", scope="local")
        acc = T.alloc_buffer((U, DV), "float32", scope="local")
        s = T.alloc_buffer((JB,), "float32", scope="local")
        lane = T.alloc_buffer((8,), "float32", scope="local")
        den = T.alloc_buffer((8,), "float32", scope="local")       # the denominator, per lane
        st = T.alloc_buffer((2,), "float32", scope="local")        # running max, block max
        b = bh // T.int64(H)
        h = bh % T.int64(H)
        g = h // T.int64(GROUP)
        for i in range(S):
            lo, hi = key_range(i + Skv - S, Skv)
            for c in range(T.int64(D)):
                qs[c] = T.Cast("float32", Q[b, h, i, c]) * T.float32(scale)
            for u, c in T.grid(T.int64(U), T.int64(DV)):
                acc[u, c] = zero
            for c in T.vectorized(T.int64(8)):
                den[c] = zero
            if sinks:
                st[0] = T.Cast("float32", SK[h])
                den[0] = T.float32(1.0)
            else:
                st[0] = ninf
            for kb in range(lo // T.int64(JB), (hi + T.int64(JB - 1)) // T.int64(JB)):
                j0 = kb * T.int64(JB)
                for jj in T.vectorized(T.int64(JB)):
                    s[jj] = zero
                for c in range(T.int64(D)):
                    for jj in T.vectorized(T.int64(JB)):
                        s[jj] = s[jj] + qs[c] * KT[b, g, kb, c, jj]
                for jj in T.vectorized(T.int64(JB)):
                    s[jj] = score(M, s[jj], b, h, i, j0 + jj, lo, hi, Skv)
                for c in T.vectorized(T.int64(8)):
                    lane[c] = T.max(T.max(s[c], s[c + 8]), T.max(s[c + 16], s[c + 24]))
                st[1] = ninf
                for c in range(T.int64(8)):
                    st[1] = T.max(st[1], lane[c])
                m_new = T.max(st[0], st[1])
                m_use = T.Select(m_new == ninf, zero, m_new)      # all -inf so far: keep exp finite
                alpha = fastmath.exp(st[0] - m_use)
                for jj in T.vectorized(T.int64(JB)):
                    s[jj] = fastmath.exp(s[jj] - m_use)
                for c in T.vectorized(T.int64(8)):
                    den[c] = den[c] * alpha + ((s[c] + s[c + 8]) + (s[c + 16] + s[c + 24]))
                for u, c in T.grid(T.int64(U), T.int64(DV)):
                    acc[u, c] = acc[u, c] * alpha
                # all JB keys into U independent accumulator rows (FMA latency); an invisible
                # key has weight exactly 0 and reads a clamped (valid) row of V
                for t in range(T.int64(JB // U)):
                    for u in T.unroll(T.int64(U)):
                        for c in T.vectorized(T.int64(DV)):
                            acc[u, c] = acc[u, c] + s[t * T.int64(U) + u] * T.Cast(
                                "float32", V[b, g, T.min(j0 + t * T.int64(U) + u, Skv - 1), c])
                st[0] = m_new
            st[1] = zero
            for c in range(T.int64(8)):
                st[1] = st[1] + den[c]
            for c in T.vectorized(T.int64(DV)):
                O[b, h, i, c] = T.Cast(dtype, T.Select(st[1] > zero, sum_rows(acc, c) / st[1], zero))

    @T.prim_func(private=True)
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, s_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        S = T.int64()
        Skv = T.int64()
        Q = T.match_buffer(q_h, (B, H, S, D), dtype)
        K = T.match_buffer(k_h, (B, KV, Skv, D), dtype)
        V = T.match_buffer(v_h, (B, KV, Skv, DV), dtype)
        M = T.match_buffer(m_h, mshape, mask_dtype)
        SK = T.match_buffer(s_h, (H if sinks else 1,), sinks_dtype)
        O = T.match_buffer(o_h, (B, H, S, DV), dtype)
        KT = T.alloc_buffer((B, KV, blocks(Skv), D, JB), "float32")
        if B * T.int64(H) * S * Skv * T.int64(D + DV) >= T.int64(PARALLEL_MIN_MACS):
            for bg in T.parallel(B * KV):
                copy_k(K, KT, Skv, bg)
            for bh in T.parallel(B * H):
                head(Q, KT, V, M, SK, O, S, Skv, bh)
        else:
            for bg in range(B * KV):
                copy_k(K, KT, Skv, bg)
            for bh in range(B * H):
                head(Q, KT, V, M, SK, O, S, Skv, bh)

    return attention

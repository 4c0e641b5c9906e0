"""Attention in BHSD layout as one hand-scheduled TIR function (flash-style, a tile of query rows at a time).

- GQA by indexing kv head h // group (K/V never repeated).
- K is copied once per call into key blocks of JB ([B, KV, Skv/JB, D, JB], zero-padded),
  so the q.k loop is JB-wide FMAs over contiguous keys.
- Causal / sliding-window rows visit only the key blocks that hold visible keys (loop
  bounds from the row's position); the two partial edge blocks are masked by select.
- QB query rows per tile share every K and V vector load (rows past the end repeat the last).
- Two passes per query tile over its visible key blocks: the scores go to a per-task [QB, Skv]
  scratch with each row's max kept per lane, then exp(score - max) and the P.V products run block
  by block. An online softmax (a rescale of the denominator and accumulators per block) had cost
  more than the products at small heads: 4 heads of 24 at 128 tokens took 87 us on one core, 65
  now. exp is fastmath.exp (vectorised, exact 0 for -inf).
- `softcap` c: each score becomes c * tanh(s / c) before any mask (fastmath.tanh).
- A sink is one extra logit of the row (it takes part in the max and the denominator) that adds no value.
- A query that sees no key (l == 0) outputs zeros.
(batch, head) tasks run in parallel when the work is big enough (parallel.py).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from . import fastmath
from .isa import vector_lanes
from .parallel import PARALLEL_MIN_MACS

# A counted multiply-add here (S x Skv x (D + Dv), causal or not) takes several times a GEMM's on one
# core (the softmax rides on it, small heads fill few lanes: 75 us for qwen3_moe_a's 2.1M at 4 heads of
# 16, where a GEMM does 8M in about 150 us), so attention goes parallel from a quarter of the GEMMs'
# threshold. That export's 128-token prefill: 0.450 -> 0.392 ms; deepseek_v3_a's 0.875 -> 0.715 ms.
PARALLEL_MIN_ATTENTION_MACS = PARALLEL_MIN_MACS // 4
QUERY_ROWS = 4      # per tile: each key / value vector load serves them all


def key_block() -> int:
    """Keys per block (JB), and the widest P.V column chunk (CW): two vectors, so that a tile's
    QUERY_ROWS x JB scores and QUERY_ROWS x CW accumulators take 8 registers each (of AVX2's 16 and
    AVX-512's 32). On AVX2 this tile (4 rows, 16 keys, 16 columns) beat the former 2 x 32 x 32 by 9-17%
    at heads of 16, 64 and 128 (a causal head of 16 at 128 tokens: 132 -> 109 us; 12 heads of 128 at
    512 tokens: 15.7 -> 13.1 ms, serial)."""
    return 2 * vector_lanes()


@cached_kernel
def attention_func(*, num_heads: int, kv_heads: int, d: int, dv: int, scale: float, causal: bool, window: int,
                   mask_shape=None, mask_dtype: str = "float32", sinks: bool = False, sinks_dtype: str = "float32",
                   dtype: str = "float32", softcap: float = 0.0, rows: int = 0):
    """The PrimFunc attention(q, k, v, mask, sinks, out) for these static sizes and options.

    q [B, H, S, D], k [B, KV, Skv, D], v [B, KV, Skv, Dv] (B, S, Skv symbolic). `mask_shape`: the
    explicit mask's shape, right-aligned to [B, H, S, Skv], 1 where it broadcasts (any other entry
    is bound at call time); None: no mask. Absent mask / sinks are still parameters (the caller
    passes a one-element placeholder) so that one signature serves every variant. `rows`: query
    rows per tile (0: QUERY_ROWS)."""
    QB = rows or QUERY_ROWS
    H, KV, D, DV = num_heads, kv_heads, d, dv
    GROUP = H // KV
    has_mask = mask_shape is not None
    mshape = [tirx.IntImm("int64", 1) if x == 1 else tirx.Var(f"m{n}", "int64")
              for n, x in enumerate(mask_shape or [1])]
    JB = key_block()
    CW = next(w for w in (32, 16, 8, 4, 2, 1) if DV % w == 0 and w <= JB)   # P.V chunk: QB x CW accumulators
    ninf = tirx.const(float("-inf"), "float32")
    zero = tirx.const(0.0, "float32")

    def key_range(pos, skv):
        """[lo, hi): the keys query position `pos` may see."""
        hi = tirx.min(skv, pos + 1) if causal else skv
        lo = tirx.max(tirx.IntImm("int64", 0), pos - window + 1) if window else tirx.IntImm("int64", 0)
        return lo, hi

    def tree(op, xs):
        """op over xs as a balanced tree (independent halves: no serial dependency chain)"""
        return xs[0] if len(xs) == 1 else op(tree(op, xs[:len(xs) // 2]), tree(op, xs[len(xs) // 2:]))

    def blocks(n):
        """ceil(n / JB), inlined (a let-bound extent cannot size a buffer)"""
        return (n + JB - 1) // JB

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
        qs = T.alloc_buffer((QB, D), "float32", scope="local")
        acc = T.alloc_buffer((QB, DV), "float32", scope="local")
        s = T.alloc_buffer((QB, JB), "float32", scope="local")
        p = T.alloc_buffer((QB, blocks(Skv) * T.int64(JB)), "float32")  # a tile's scores, then its weights
        # the row max and the denominator per lane of a key block, folded once per tile: folded per block
        # (a block's two vector halves added), LLVM moved each half out through scalar lane extracts on
        # AVX2, 11% of a head of 16's attention at 128 tokens, 5% of a head of 128's at 512
        top = T.alloc_buffer((QB, JB), "float32", scope="local")
        den = T.alloc_buffer((QB, JB), "float32", scope="local")
        st = T.alloc_buffer((QB, 2), "float32", scope="local")           # row max (exp-safe), denominator
        b = bh // T.int64(H)
        h = bh % T.int64(H)
        g = h // T.int64(GROUP)
        for it in range((S + T.int64(QB - 1)) // T.int64(QB)):
            i0 = it * T.int64(QB)
            # rows past S repeat the last row (no branch in the inner loops) and are not stored
            kb0 = key_range(i0 + Skv - S, Skv)[0] // T.int64(JB)
            kb1 = (key_range(T.min(i0 + T.int64(QB - 1), S - 1) + Skv - S, Skv)[1] + T.int64(JB - 1)) // T.int64(JB)
            for r in T.unroll(QB):
                for c in range(T.int64(D)):
                    qs[r, c] = T.Cast("float32", Q[b, h, T.min(i0 + r, S - 1), c]) * T.float32(scale)
                for c in T.vectorized(T.int64(DV)):
                    acc[r, c] = zero
                for c in T.vectorized(T.int64(JB)):
                    top[r, c] = T.Cast("float32", SK[h]) if sinks else ninf
                    den[r, c] = zero
            # pass 1: the scores of every visible key block, and each row's max kept per lane
            for kb in range(kb0, kb1):
                for r in T.unroll(QB):
                    for jj in T.vectorized(T.int64(JB)):
                        s[r, jj] = zero
                # QB rows share each key vector load
                for c in range(T.int64(D)):
                    for r in T.unroll(QB):
                        for jj in T.vectorized(T.int64(JB)):
                            s[r, jj] = s[r, jj] + qs[r, c] * KT[b, g, kb, c, jj]
                for r in T.unroll(QB):
                    ri = T.min(i0 + r, S - 1)
                    lo, hi = key_range(ri + Skv - S, Skv)
                    for jj in T.vectorized(T.int64(JB)):
                        p[r, kb * T.int64(JB) + jj] = score(M, s[r, jj], b, h, ri, kb * T.int64(JB) + jj, lo, hi, Skv)
                        top[r, jj] = T.max(top[r, jj], p[r, kb * T.int64(JB) + jj])
            for r in T.unroll(QB):
                st[r, 0] = tree(T.max, [top[r, c] for c in range(JB)])      # log-depth, not a chain
                st[r, 0] = T.Select(st[r, 0] == ninf, zero, st[r, 0])      # nothing visible: keep exp finite
                if sinks:
                    den[r, 0] = fastmath.exp(T.Cast("float32", SK[h]) - st[r, 0])
            # pass 2: weights exp(score - max) and the weighted values, block by block (the block's
            # weights still in L1); an invisible key has weight exactly 0 and reads a clamped (valid)
            # row of V. Column chunks of CW keep the QB x CW accumulators in registers for wide heads.
            for kb in range(kb0, kb1):
                for r in T.unroll(QB):
                    for jj in T.vectorized(T.int64(JB)):
                        p[r, kb * T.int64(JB) + jj] = fastmath.exp(p[r, kb * T.int64(JB) + jj] - st[r, 0])
                        den[r, jj] = den[r, jj] + p[r, kb * T.int64(JB) + jj]
                for cc in range(T.int64(DV // CW)):
                    for t in range(T.int64(JB)):
                        for r in T.unroll(QB):
                            for c in T.vectorized(T.int64(CW)):
                                acc[r, cc * T.int64(CW) + c] = acc[r, cc * T.int64(CW) + c] + p[r, kb * T.int64(JB) + t] * T.Cast(
                                    "float32", V[b, g, T.min(kb * T.int64(JB) + t, Skv - 1), cc * T.int64(CW) + c])
            for r in range(T.min(S - i0, T.int64(QB))):
                st[r, 1] = tree(lambda a, b: a + b, [den[r, c] for c in range(JB)])
                for c in T.vectorized(T.int64(DV)):
                    O[b, h, i0 + r, c] = T.Cast(dtype, T.Select(st[r, 1] > zero, acc[r, c] / st[r, 1], zero))

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
        if B * T.int64(H) * S * Skv * T.int64(D + DV) >= T.int64(PARALLEL_MIN_ATTENTION_MACS):
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

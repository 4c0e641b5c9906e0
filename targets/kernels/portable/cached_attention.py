"""Decode attention over a contiguous KV cache (`polyport::CachedAttention`), flash-decoding style.

Two GPU kernels (ir/fused/cache.py gives the meaning):

- `partial`: one thread block per (sequence b, kv head g, cache split sp, query row i); its threads
  are the GROUP query heads of that kv head times TPR slices of the value dim. Each thread streams
  the keys its split sees (the cached positions [lo, past) cut into `ns` contiguous splits, and, in
  the last split, the new keys up to its own row) once, with an online softmax, and writes its
  partial state (max, denominator, its slice of the accumulator). Only visible keys are read: the
  loops run over position ranges, so a step costs the context, not the reserved capacity.
- `merge`: one thread per output channel combines the ns partial states and the sink.

Causal prefill attention without a mask (past 0, the keys are the new rows) is the same pair with
one split: each query row streams its visible keys once with an online softmax and no [S, S] score
matrix is ever stored (flash-style in memory, though not tiled through shared memory).

The split count grows with the sequence's past (one split per MIN_SPLIT_KEYS cached keys, at most
MAX_SPLITS), so a long context at batch 1 still fills the GPU. K/V are never repeated per query
head (GQA/MQA by indexing); with v_in_k (shared K=V, absorbed MLA) V is the first Dv channels of K.

Threads never share data: each writes only its own outputs, so the same functions with every
bound loop made serial (`gpu=False`) compute exactly what the GPU build computes. That is how
they are checked on the CPU against the reference (tests/targets/test_portable_cache_kernels.py).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from ..cache_rules import first_cached, first_new

MAX_SPLITS = 16          # cache splits per (sequence, kv head): partial states kept per row
MIN_SPLIT_KEYS = 128     # a split only when every split keeps at least this many cached keys
MAX_TPR = 8              # threads per query row (each owns Dv / TPR channels of the accumulator)
MAX_THREADS = 1024


def loop(gpu: bool):
    """`for x in loop(n, tag)`: bound to GPU thread axis `tag`, or serial for the CPU check."""
    if gpu:
        return lambda n, tag: T.thread_binding(n, thread=tag)
    return lambda n, tag: T.serial(n)


def splits(past, max_splits: int):
    """The cache splits of a sequence with `past` cached tokens (the partial and merge kernels agree)."""
    i64 = lambda x: tirx.IntImm("int64", x)  # noqa: E731
    return tirx.max(i64(1), tirx.min(i64(max_splits), tirx.floordiv(past, i64(MIN_SPLIT_KEYS))))


def threads_per_row(group: int, dv: int) -> int:
    """The largest divisor of dv within MAX_TPR and the block's thread limit."""
    cap = min(MAX_TPR, MAX_THREADS // group)
    return max(t for t in range(1, cap + 1) if dv % t == 0)


@cached_kernel
def partial_func(*, num_heads: int, kv_heads: int, d: int, dv: int, scale: float, window: int, ring: bool,
                 v_in_k: bool, gpu: bool, dtype: str = "float32", max_splits: int = MAX_SPLITS,
                 softcap: float = 0.0):
    """PrimFunc partial(q, k_new, v_new, cache_k, cache_v, past_len, pm, pa): q [B, H, S, D],
    k_new [B, KV, S, D], v_new [B, KV, S, Dv], cache_k [B, KV, C, D], cache_v [B, KV, C, Dv] (before
    this step's update; v_new / cache_v are placeholders with v_in_k), past_len int64 [B];
    writes pm [B*KV, max_splits, S, G, 2] (max, denominator) and pa [B*KV, max_splits, S, G, Dv].
    Prefill attention is this with no past and one split (`prefill_attention`). `softcap` c: each
    score is c * tanh(s / c)."""
    capped = softcap > 0       # a Python bool: TVMScript resolves the branch while parsing
    H, KV, D, DV = num_heads, kv_heads, d, dv
    G = H // KV
    if G > MAX_THREADS:
        raise ValueError(f"{G} query heads per kv head exceed the {MAX_THREADS} threads of a block")
    TPR = threads_per_row(G, DV)
    DVT = DV // TPR
    bind = loop(gpu)
    ninf = tirx.const(float("-inf"), "float32")
    zero = tirx.const(0.0, "float32")

    @T.macro
    def key(KS, VS, qs, acc, st, b, g, row, c0):
        """Online-softmax update of this thread's state with the key/value in row `row` of KS/VS."""
        st[2] = zero
        for c in range(T.int64(D)):
            st[2] = st[2] + qs[c] * T.Cast("float32", KS[b, g, row, c])
        if capped:                                  # c * tanh(s / c): the soft-cap comes before the mask
            st[2] = T.float32(softcap) * T.tanh(st[2] * T.float32(1.0 / softcap))
        m_new = T.max(st[0], st[2])
        alpha = T.exp(st[0] - m_new)               # exp(-inf) = 0: the first key drops the empty state
        p = T.exp(st[2] - m_new)
        st[1] = st[1] * alpha + p
        st[0] = m_new
        for c in range(T.int64(DVT)):
            acc[c] = acc[c] * alpha + p * T.Cast("float32", VS[b, g, row, c0 + c])

    @T.prim_func(private=True)
    def cached_attention_partial(q_h: T.handle, kn_h: T.handle, vn_h: T.handle, kc_h: T.handle,
                                 vc_h: T.handle, pl_h: T.handle, pm_h: T.handle, pa_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        S = T.int64()
        C = T.int64()
        VR = T.int64()
        VC_ = T.int64()
        Q = T.match_buffer(q_h, (B, H, S, D), dtype)
        KN = T.match_buffer(kn_h, (B, KV, S, D), dtype)
        VN = T.match_buffer(vn_h, (B, KV, VR, DV) if not v_in_k else (VR,), dtype)
        KC = T.match_buffer(kc_h, (B, KV, C, D), dtype)
        VC = T.match_buffer(vc_h, (B, KV, C, DV) if not v_in_k else (VC_,), dtype)
        PL = T.match_buffer(pl_h, (B,), "int64")
        PM = T.match_buffer(pm_h, (B * KV, max_splits, S, G, 2), "float32")
        PA = T.match_buffer(pa_h, (B * KV, max_splits, S, G, DV), "float32")
        for bx in bind(B * T.int64(KV * max_splits), "blockIdx.x"):
            for i in bind(S, "blockIdx.y"):
                for tx in bind(T.int64(G * TPR), "threadIdx.x"):
                    qs = T.alloc_buffer((D,), "float32", scope="local")
                    acc = T.alloc_buffer((DVT,), "float32", scope="local")
                    st = T.alloc_buffer((3,), "float32", scope="local")     # max, denominator, score
                    sp = bx % T.int64(max_splits)
                    bg = bx // T.int64(max_splits)
                    b = bg // T.int64(KV)
                    g = bg % T.int64(KV)
                    r = tx // T.int64(TPR)
                    c0 = tx % T.int64(TPR) * T.int64(DVT)
                    past = PL[b]
                    ns = splits(past, max_splits)
                    if sp < ns:
                        lo = first_cached(past, i, C, window, ring)
                        chunk = (T.max(past - lo, T.int64(0)) + ns - T.int64(1)) // ns
                        c_lo = T.min(past, lo + sp * chunk)
                        c_hi = T.min(past, c_lo + chunk)
                        for c in range(T.int64(D)):
                            qs[c] = T.Cast("float32", Q[b, g * T.int64(G) + r, i, c]) * T.float32(scale)
                        for c in range(T.int64(DVT)):
                            acc[c] = zero
                        st[0] = ninf
                        st[1] = zero
                        for j in range(c_hi - c_lo):
                            key(KC, KC if v_in_k else VC, qs, acc, st, b, g,
                                T.floormod(c_lo + j, C) if ring else c_lo + j, c0)
                        if sp == ns - T.int64(1):
                            j_lo = first_new(i, window)
                            for j in range(i + T.int64(1) - j_lo):
                                key(KN, KN if v_in_k else VN, qs, acc, st, b, g, j_lo + j, c0)
                        if c0 == T.int64(0):
                            PM[bg, sp, i, r, 0] = st[0]
                            PM[bg, sp, i, r, 1] = st[1]
                        for c in range(T.int64(DVT)):
                            PA[bg, sp, i, r, c0 + c] = acc[c]

    return cached_attention_partial


@cached_kernel
def merge_func(*, num_heads: int, kv_heads: int, dv: int, sinks: bool, gpu: bool, dtype: str = "float32",
               sinks_dtype: str = "float32", max_splits: int = MAX_SPLITS):
    """PrimFunc merge(pm, pa, past_len, sinks, out): out [B, H, S, Dv] = sum_s pa_s e^(m_s - M) /
    (sum_s l_s e^(m_s - M) + the sink's e^(sink - M)) over the sequence's splits."""
    H, KV, DV = num_heads, kv_heads, dv
    G = H // KV
    TX = min(DV, 256)
    bind = loop(gpu)
    ninf = tirx.const(float("-inf"), "float32")
    zero = tirx.const(0.0, "float32")

    @T.prim_func(private=True)
    def cached_attention_merge(pm_h: T.handle, pa_h: T.handle, pl_h: T.handle, s_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        B = T.int64()
        S = T.int64()
        PM = T.match_buffer(pm_h, (B * KV, max_splits, S, G, 2), "float32")
        PA = T.match_buffer(pa_h, (B * KV, max_splits, S, G, DV), "float32")
        PL = T.match_buffer(pl_h, (B,), "int64")
        SK = T.match_buffer(s_h, (H if sinks else 1,), sinks_dtype)
        O = T.match_buffer(o_h, (B, H, S, DV), dtype)
        for bh in bind(B * T.int64(H), "blockIdx.x"):
            for i in bind(S, "blockIdx.y"):
                for tx in bind(T.int64(TX), "threadIdx.x"):
                    mm = T.alloc_buffer((3,), "float32", scope="local")    # max, denominator, numerator
                    b = bh // T.int64(H)
                    h = bh % T.int64(H)
                    bg = b * T.int64(KV) + h // T.int64(G)
                    r = h % T.int64(G)
                    ns = splits(PL[b], max_splits)
                    mm[0] = T.Cast("float32", SK[h]) if sinks else ninf
                    for s in range(ns):
                        mm[0] = T.max(mm[0], PM[bg, s, i, r, 0])
                    m_use = T.Select(mm[0] == ninf, zero, mm[0])
                    mm[1] = T.exp(T.Cast("float32", SK[h]) - m_use) if sinks else zero
                    for s in range(ns):
                        mm[1] = mm[1] + PM[bg, s, i, r, 1] * T.exp(PM[bg, s, i, r, 0] - m_use)
                    for cc in range(T.int64((DV + TX - 1) // TX)):
                        if cc * T.int64(TX) + tx < T.int64(DV):
                            mm[2] = zero
                            for s in range(ns):
                                mm[2] = mm[2] + PA[bg, s, i, r, cc * T.int64(TX) + tx] * \
                                    T.exp(PM[bg, s, i, r, 0] - m_use)
                            O[b, h, i, cc * T.int64(TX) + tx] = T.Cast(
                                dtype, T.Select(mm[1] > zero, mm[2] / mm[1], zero))

    return cached_attention_merge

"""Decode attention over a KV cache (`polyport::CachedAttention`) as one hand-scheduled TIR function.

Few new queries (k, typically 1) per sequence attend over the cache [B, KV, C, D] (linear: slot =
position; ring: slot = position % C) plus the k new keys. At batch 1 this is bandwidth bound, so:
- one task streams a kv head's cache once for all GROUP query heads of that kv head (GQA/MQA by
  indexing; K/V are never repeated), one query row at a time;
- each query's visible keys are contiguous position ranges (cached [lo, past), new [jlo, i]), so
  the loops visit exactly those keys and no mask is evaluated;
- blocks of JB keys: q.k vectorised over D in VL lanes (for many rows per kv head in tiles of rows x
  keys, qk_tile), online softmax (one rescale per block),
  P.V over tiles of query rows x value columns (pv_tile) whose accumulators stay in registers;
- when (batch x kv heads) is below the split target and the cache is long, the cached range is
  split across tasks; each task writes a partial softmax state (max, denominator, accumulator)
  and a final pass merges them (and the sink, which adds one logit and no value);
- softcap c: each score is c * tanh(s / c) (the keys visited are the visible ones, so no mask follows);
- v_in_k: V is the first Dv channels of K (shared K=V, absorbed MLA): one buffer streamed.
Tasks run on TVM's thread pool only when the work is big enough (parallel.py).
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from . import fastmath
from ..cache_rules import first_cached, first_new
from .parallel import PARALLEL_MIN_MACS, PARALLEL_MIN_STREAM_BYTES

JB = 16                 # keys per online-softmax block: one rescale of the accumulators per block
VL = 8                  # lanes of the q.k partial sums (one AVX2 vector)
SPLIT_TASKS = 16        # split the cache until (batch x kv heads x splits) reaches this ...
MIN_SPLIT_KEYS = 256    # ... while every split keeps at least this many cached keys
MAX_SPLITS = SPLIT_TASKS
TILE_VECTORS = 8        # a q.k or P.V tile's accumulators of VL lanes, kept in registers (of AVX2's 16)
PV_TILE_ROWS = 4        # from this many query rows per kv head P.V is compute-bound enough to tile
QK_TILE_ROWS = 8        # from this many query rows per kv head q.k is compute-bound enough to tile


def _register_tile(rows: int, widths: dict[int, int]) -> tuple[int, int]:
    """(r, w): r query rows (r | rows) x w of `widths` ({width: vectors of VL lanes it loads}), within
    TILE_VECTORS accumulators: the tile with the most FMAs per load (r x vectors / (r + vectors)), then
    the widest."""
    tiles = [(r, w) for r in range(1, rows + 1) if rows % r == 0 for w, v in widths.items()
             if r * v <= TILE_VECTORS]
    return max(tiles, key=lambda t: (t[0] * widths[t[1]] / (t[0] + widths[t[1]]), t[1]))


def pv_tile(rows: int, dv: int) -> tuple[int, int]:
    """(RW, CW): P.V runs over RW query rows x CW value columns at a time (CW | dv), the accumulators in
    registers across a block's keys, each value vector load serving RW rows. Absorbed MLA (16 rows of 256
    columns) at batch 8, context 1024: 3.3 -> 2.2 ms. Below PV_TILE_ROWS, key by key over whole rows (a
    tile of them all): there the kernel streams the cache (rows FMAs per element read), and the column
    passes' strided reads of V cost more than the tiles save (llama_500m, 3 rows: its batch-8 decode step
    3% slower with them)."""
    if rows < PV_TILE_ROWS:
        return rows, dv
    return _register_tile(rows, {cw: -(-cw // VL) for cw in range(1, dv + 1) if dv % cw == 0})


def qk_tile(rows: int) -> tuple[int, int]:
    """(QR, KW): from QK_TILE_ROWS rows per kv head, q.k runs QR query rows x KW keys at a time (KW | JB):
    independent partial sums, each key vector load serving QR rows and each query vector KW keys. Absorbed
    MLA (16 rows over a 288-wide latent) at batch 8, context 1024: 3.8 -> 2.7 ms. Below it, key by key:
    Qwen3-MoE's 4 rows were 10% slower tiled, the kernel streaming its cache there."""
    if rows < QK_TILE_ROWS:
        return 1, 1
    return _register_tile(rows, {kw: kw for kw in range(1, JB + 1) if JB % kw == 0})


@cached_kernel
def cached_attention_func(*, num_heads: int, kv_heads: int, d: int, dv: int, scale: float, window: int,
                          ring: bool, v_in_k: bool, sinks: bool, dtype: str = "float32",
                          sinks_dtype: str = "float32", softcap: float = 0.0):
    """PrimFunc cached_attention(q, k_new, v_new, cache_k, cache_v, past_len, sinks, out).

    q [B, H, S, D], k_new [B, KV, S, D], v_new [B, KV, S, Dv], cache_k [B, KV, C, D],
    cache_v [B, KV, C, Dv] (the cache before this step's update), past_len int64 [B],
    sinks [H] (a one-element placeholder when absent), out [B, H, S, Dv]; B, S, C symbolic.
    With v_in_k, v_new / cache_v are not read (the caller may pass placeholders of any shape)."""
    H, KV, D, DV = num_heads, kv_heads, d, dv
    G = H // KV
    ninf = tirx.const(float("-inf"), "float32")
    zero = tirx.const(0.0, "float32")
    DVEC = D // VL * VL
    capped = softcap > 0       # a Python bool: TVMScript resolves the branch while parsing
    RW, CW = pv_tile(G, DV)
    row_loop = T.unroll if G >= PV_TILE_ROWS else T.serial   # whole rows: DV accumulators each, in memory
    QR, KW = qk_tile(G)
    qk_loop = T.unroll if G >= QK_TILE_ROWS else T.serial    # one sum (1 x 1): a loop as before

    def slot_of(j, C, cached):
        """The buffer row of key j: ring cache slots wrap, linear slots and new keys do not."""
        return tirx.floormod(j, C) if (cached and ring) else j

    @T.macro
    def keys(KS, VS, qs, sc, acc, st, lanes, slots, b, g, p0, n, C, cached):
        """Online-softmax update of the G rows over the n keys at positions p0.. (cached: cache slots,
        else rows of the new keys)."""
        for kq in range((n + T.int64(KW - 1)) // T.int64(KW)):       # QR x KW sums a tile (qk_tile)
            for k in T.unroll(T.int64(KW)):
                slots[k] = slot_of(p0 + T.min(kq * T.int64(KW) + k, n - T.int64(1)), C, cached)  # past n: a valid row
            for rb in range(T.int64(G // QR)):
                for r, k in T.grid(T.int64(QR), T.int64(KW)):
                    for l in T.vectorized(T.int64(VL)):
                        lanes[r, k, l] = zero
                for c8 in range(T.int64(D // VL)):
                    for r in qk_loop(T.int64(QR)):
                        for k in qk_loop(T.int64(KW)):
                            for l in T.vectorized(T.int64(VL)):
                                lanes[r, k, l] = lanes[r, k, l] + qs[rb * T.int64(QR) + r, c8 * T.int64(VL) + l] * \
                                    T.Cast("float32", KS[b, g, slots[k], c8 * T.int64(VL) + l])
                for r, k in T.grid(T.int64(QR), T.int64(KW)):
                    row = rb * T.int64(QR) + r
                    jj = kq * T.int64(KW) + k                # past n: a score never read
                    sc[row, jj] = ((lanes[r, k, 0] + lanes[r, k, 1]) + (lanes[r, k, 2] + lanes[r, k, 3])) + \
                        ((lanes[r, k, 4] + lanes[r, k, 5]) + (lanes[r, k, 6] + lanes[r, k, 7]))
                    for c in range(T.int64(DVEC), T.int64(D)):
                        sc[row, jj] = sc[row, jj] + qs[row, c] * T.Cast("float32", KS[b, g, slots[k], c])
                    if capped:
                        sc[row, jj] = fastmath.soft_cap(sc[row, jj], softcap)
        for r in range(T.int64(G)):
            st[1] = st[2 * r + 2]                      # running max of row r
            for jj in range(n):
                st[1] = T.max(st[1], sc[r, jj])
            alpha = fastmath.exp(st[2 * r + 2] - st[1])  # exp(-inf) is exactly 0
            st[2 * r + 3] = st[2 * r + 3] * alpha
            for c in T.vectorized(T.int64(DV)):
                acc[r, c] = acc[r, c] * alpha
            for jj in range(n):
                sc[r, jj] = fastmath.exp(sc[r, jj] - st[1])
                st[2 * r + 3] = st[2 * r + 3] + sc[r, jj]
            st[2 * r + 2] = st[1]
        for cc in range(T.int64(DV // CW)):                  # RW x CW accumulators stay in registers
            for rb in range(T.int64(G // RW)):
                for jj in range(n):
                    slot = slot_of(p0 + jj, C, cached)
                    for r in row_loop(T.int64(RW)):
                        for c in T.vectorized(T.int64(CW)):
                            acc[rb * T.int64(RW) + r, cc * T.int64(CW) + c] = \
                                acc[rb * T.int64(RW) + r, cc * T.int64(CW) + c] + sc[rb * T.int64(RW) + r, jj] * \
                                T.Cast("float32", VS[b, g, slot, cc * T.int64(CW) + c])

    @T.macro
    def task(Q, KN, VN, KC, VC, PL, PM, PA, S, C, ns, t):
        """Task t = (b, g, split): for each new query, the partial state over its share of the keys."""
        qs = T.alloc_buffer((G, D), "float32", scope="local")
        acc = T.alloc_buffer((G, DV), "float32", scope="local")
        sc = T.alloc_buffer((G, JB), "float32", scope="local")
        st = T.alloc_buffer((2 * G + 2,), "float32", scope="local")   # [scratch, scratch, (m, l) per row]
        lanes = T.alloc_buffer((QR, KW, VL), "float32", scope="local")
        slots = T.alloc_buffer((KW,), "int64", scope="local")
        sp = t % ns
        bg = t // ns
        b = bg // T.int64(KV)
        g = bg % T.int64(KV)
        past = PL[b]
        for i in range(S):
            lo = first_cached(past, i, C, window, ring)
            chunk = (T.max(past - lo, T.int64(0)) + ns - T.int64(1)) // ns
            c_lo = T.min(past, lo + sp * chunk)
            c_hi = T.min(past, c_lo + chunk)
            for r, c in T.grid(T.int64(G), T.int64(D)):
                qs[r, c] = T.Cast("float32", Q[b, g * T.int64(G) + r, i, c]) * T.float32(scale)
            for r, c in T.grid(T.int64(G), T.int64(DV)):
                acc[r, c] = zero
            for r in range(T.int64(G)):
                st[2 * r + 2] = ninf
                st[2 * r + 3] = zero
            for kb in range((c_hi - c_lo + T.int64(JB - 1)) // T.int64(JB)):
                keys(KC, KC if v_in_k else VC, qs, sc, acc, st, lanes, slots, b, g, c_lo + kb * T.int64(JB),
                     T.min(T.int64(JB), c_hi - c_lo - kb * T.int64(JB)), C, True)
            if sp == ns - T.int64(1):
                j_lo = first_new(i, window)
                for kb in range((i + T.int64(1) - j_lo + T.int64(JB - 1)) // T.int64(JB)):
                    keys(KN, KN if v_in_k else VN, qs, sc, acc, st, lanes, slots, b, g, j_lo + kb * T.int64(JB),
                         T.min(T.int64(JB), i + T.int64(1) - j_lo - kb * T.int64(JB)), C, False)
            for r in range(T.int64(G)):
                PM[bg, sp, i, r, 0] = st[2 * r + 2]
                PM[bg, sp, i, r, 1] = st[2 * r + 3]
                for c in T.vectorized(T.int64(DV)):
                    PA[bg, sp, i, r, c] = acc[r, c]

    @T.macro
    def merge(SK, PM, PA, O, S, ns, bh):
        """out = sum_s acc_s e^(m_s - M) / (sum_s l_s e^(m_s - M) + sink), over the ns partial states."""
        tot = T.alloc_buffer((DV,), "float32", scope="local")
        mm = T.alloc_buffer((2,), "float32", scope="local")     # overall max, denominator
        b = bh // T.int64(H)
        h = bh % T.int64(H)
        bg = b * T.int64(KV) + h // T.int64(G)
        r = h % T.int64(G)
        for i in range(S):
            mm[0] = T.Cast("float32", SK[h]) if sinks else ninf
            for s in range(ns):
                mm[0] = T.max(mm[0], PM[bg, s, i, r, 0])
            m_use = T.Select(mm[0] == ninf, zero, mm[0])
            mm[1] = fastmath.exp(T.Cast("float32", SK[h]) - m_use) if sinks else zero
            for c in T.vectorized(T.int64(DV)):
                tot[c] = zero
            for s in range(ns):
                w = fastmath.exp(PM[bg, s, i, r, 0] - m_use)
                mm[1] = mm[1] + PM[bg, s, i, r, 1] * w
                for c in T.vectorized(T.int64(DV)):
                    tot[c] = tot[c] + PA[bg, s, i, r, c] * w
            for c in T.vectorized(T.int64(DV)):
                O[b, h, i, c] = T.Cast(dtype, T.Select(mm[1] > zero, tot[c] / mm[1], zero))

    @T.prim_func(private=True)
    def cached_attention(q_h: T.handle, kn_h: T.handle, vn_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                         pl_h: T.handle, s_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
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
        SK = T.match_buffer(s_h, (H if sinks else 1,), sinks_dtype)
        O = T.match_buffer(o_h, (B, H, S, DV), dtype)
        st = T.alloc_buffer((2,), "int64", scope="local")        # longest past, splits
        st[0] = T.int64(0)
        for b in range(B):
            st[0] = T.max(st[0], PL[b])
        work = B * T.int64(H) * S * (st[0] + S) * T.int64(D + DV)
        streamed = B * T.int64(KV) * (st[0] + S) * T.int64((D + (0 if v_in_k else DV)) * tvm.DataType(dtype).bits // 8)
        big = T.Or(work >= T.int64(PARALLEL_MIN_MACS), streamed >= T.int64(PARALLEL_MIN_STREAM_BYTES))
        st[1] = T.int64(1)
        if big:
            st[1] = T.max(T.int64(1), T.min(T.min(T.int64(MAX_SPLITS), st[0] // T.int64(MIN_SPLIT_KEYS)),
                                            (T.int64(SPLIT_TASKS) + B * T.int64(KV) - T.int64(1)) // (B * T.int64(KV))))
        PM = T.alloc_buffer((B * KV, MAX_SPLITS, S, G, 2), "float32")
        PA = T.alloc_buffer((B * KV, MAX_SPLITS, S, G, DV), "float32")
        if big:
            for t in T.parallel(B * T.int64(KV) * st[1]):
                task(Q, KN, VN, KC, VC, PL, PM, PA, S, C, st[1], t)
        else:
            for t in range(B * T.int64(KV)):
                task(Q, KN, VN, KC, VC, PL, PM, PA, S, C, T.int64(1), t)
        for bh in range(B * T.int64(H)):
            merge(SK, PM, PA, O, S, st[1], bh)

    return cached_attention

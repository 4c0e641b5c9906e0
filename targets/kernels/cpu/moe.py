"""MoE as one hand-written TIR kernel: route -> group by expert -> per-expert GEMMs -> combine.

One call per MoE node (the routing used to be a dozen Relax ops, each a VM call and an allocation,
which cost more than the expert math on small models):

1. route, per token: router logits (x @ router_w, plus the router bias), scoring, optional group-limited selection,
   top-k (ties to the lower expert, as the reference's stable argsort) or the hash table, routing
   weights (renormalised, scaled). Meaning: ir/fused/moe.py.
2. group the (token, slot) pairs by expert (counts -> offsets -> a stable counting sort) and cut
   each expert's rows into tiles of at most TR rows (RB, STREAM_RB or PACKED_RB);
3. per tile (in parallel when the work is big enough): gate/up GEMM over the tile's gathered token
   rows reading that expert's weights in place (plus its gate/up biases), activation, scaled by the
   routing weight, down GEMM (plus the weighted down bias); every weight vector load serves RB rows.
   f32 experts the cpu target binds column-blocked ([E, N / NB, K, NB], lowering/dense.py) run gemm.py's
   register tiles instead: tiles of up to PACKED_RB rows, MB x NB accumulators (6 x 16 on AVX2), each
   column block of an expert read from memory once per tile. qwen3_moe_700m's experts at 128 / 512
   tokens on an AVX2 EPYC: 46.9 / 192 ms per layer row-major, 17.1 / 57.9 ms packed; one token 0.90 /
   0.82 ms, eight 5.5 / 5.7 ms;
4. combine: each token sums its top_k rows (an inverse permutation instead of a racy scatter-add).

Quantized experts (ir/fused/moe.py: codes [E, K / 2 | K, N] and scales) are decoded in registers where
the GEMMs load them (quant_codes.py), each decoded vector serving the tile's RB rows: no f32 copy. Where the
CPU has byte dot products (`column_blocked`), the experts are bound column-blocked and a tile of at most
BYTE_DOT_ROWS rows (decode) runs its GEMVs as int_dot.py's byte dot products instead, a row at a time,
16 columns per register.

The kernel carries its own loop schedule (parallel, vectorised over the contiguous output axis) and
is marked opaque, so the schedule module and Relax's fusion leave it alone.
"""
from __future__ import annotations

import dataclasses

import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from ..quant_codes import value
from . import int_dot
from .prefetch import PREFETCH_BYTES, prefetch
from .gemm import TAIL_ROWS, rows_past, tile_rows, whole_tiles
from .mlp import activation, clamp_up
from .isa import vector_lanes
from .parallel import PARALLEL_MIN_MACS, PARALLEL_MIN_STREAM_BYTES

RB = 4                          # token rows per tile: each weight vector load serves RB rows
STREAM_RB = 8                   # rows per streamed tile: a streamed expert is read once per tile, its accumulators
                                # (8 rows of gate and up, 32 KB at I = 512) stay in L1 (4 rows: this kernel
                                # 1.4x slower on qwen3_moe_700m's 128-token prefill; 12 or 16: slower again)
STREAM_BYTES = 256 << 10        # an expert's gate matrix above this streams (tile_stream)
PACKED_RB = 48                  # rows per tile over packed f32 experts: a column block of an expert (64 KB at H =
                                # 1024 on AVX2) is read from memory once per tile and from L2 by each of its row tiles
BYTE_DOT_ROWS = 2               # a tile of at most this many rows runs as byte dot products (where usable)
CHUNKS = 8                      # parallel chunks of tiles (a few per thread, so uneven experts still balance)
NEG_INF = float("-inf")
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """The static facts the kernel is specialised on (the token count stays symbolic)."""
    hidden: int              # H, x's last dim
    experts: int             # E
    top_k: int               # K
    inter: int               # I, the expert's intermediate size
    out: int                 # Ho, w_down's last dim
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    scaling: float = 1.0
    act: str = "silu"
    clamp: float = 0.0
    alpha: float = 1.0
    up_offset: float = 0.0
    router_bias: bool = False   # router_b [E] added to the logits
    routing: str = "topk"       # or "sparsemixer" (PhiMoE: K = 2, weights from masked softmaxes of the logits)
    jitter_eps: float = 0.0
    biases: bool = False        # b_gate, b_up [E, I] and b_down [E, Ho] (zeros where the node has none)
    hash_vocab: int = 0      # > 0: hash routing over a [hash_vocab, K] table
    x_dtype: str = "float32"
    w_dtype: str = "float32"
    table_dtype: str = "int64"
    bits: int = 0            # 4 | 8: expert weights are codes [E, K / 2 | K, N] with scales [E, KB, N]
    block: int = 0           # (ir/fused/moe.py), decoded in registers where the GEMMs read them
    fmt: str = "int"
    column_block: int = 0    # > 0: codes bound [E, N / NB, K / 2 | K, NB] and scales [E, N / NB, KB, NB] (NB this);
                             # f32 experts bound [E, N / NB, K, NB] (mlp.pack_block): register-tiled GEMMs


def column_blocked(bits: int, fmt: str, block: int, hidden: int, inter: int, out: int) -> int:
    """NB for binding quantized experts column-blocked (each 16-column block of an expert one contiguous run,
    as the byte-dot GEMVs read it: 0.24 instead of 0.27 ms for qwen3_moe_700m's experts at one token, in cache,
    and no pass striding through the rows when they come from DRAM), 0 to bind them as stored."""
    lanes = int_dot.LANES
    fits = hidden % block == 0 and inter % block == 0 and inter % lanes == 0 and out % lanes == 0
    return lanes if fits and int_dot.usable(bits, fmt, False, block) else 0


def _lanes(n: int) -> int:
    """The vector width for a contiguous axis of static extent n (it must divide n): at most one
    register of this build's CPU (isa.py), so the RB x 2 gate / up accumulators stay in registers."""
    for w in (16, 8, 4, 2):
        if w > vector_lanes():
            continue
        if n % w == 0:
            return w
    return 1


def _vec(n: int):
    """The loop kind for a whole contiguous axis of static extent n."""
    return T.vectorized if n <= 64 else T.serial


@cached_kernel
def moe_func(s: MoeSpec) -> tirx.PrimFunc:
    """The PrimFunc: (x [T, H], router_w [H, E], e_bias [E] | (hash_table [V, K], token_ids [T]),
    w_gate [E, H, I], w_up [E, H, I], w_down [E, I, Ho] (quantized: codes), router_b [E], b_gate [E, I],
    b_up [E, I], b_down [E, Ho], gate / up / down scales ([E, KB, N]), y [T, Ho]) -> writes y. The biases
    and scales are one-element placeholders where the spec has none (`router_bias`, `biases`, `bits`)."""
    H, E, K, I, Ho = s.hidden, s.experts, s.top_k, s.inter, s.out
    G, GS = s.n_group, s.experts // max(s.n_group, 1)
    V = max(s.hash_vocab, 1)
    xdt, wdt, tdt = s.x_dtype, s.w_dtype, s.table_dtype
    f32 = "float32"
    PB = 2 if s.bits == 4 else 1        # codes per stored element along K
    HQ, IQ = H // PB, I // PB
    qdt = ("int8" if s.bits == 8 and s.fmt == "int" else "uint8") if s.bits else wdt
    rdt = "float32" if s.bits else wdt   # quantized experts keep an f32 router (passes/quantize_weights.py)
    CB = s.column_block
    g_scales, d_scales = ((E, -(-H // s.block), I), (E, -(-I // s.block), Ho)) if s.bits else ((1,), (1,))
    g_codes, d_codes = (E, HQ, I), (E, IQ, Ho)
    if CB:                                      # [E, X, N] bound as [E, N / CB, X, CB]
        g_codes, d_codes = ((e, n // CB, x, CB) for e, x, n in (g_codes, d_codes))
    if CB and s.bits:
        g_scales, d_scales = ((e, n // CB, x, CB) for e, x, n in (g_scales, d_scales))
    macs_per_row = 2 * H * I + I * Ho
    streams = K * macs_per_row * tvm.DataType(wdt).bits // 8 >= PARALLEL_MIN_STREAM_BYTES
    loop_e, loop_o = _vec(E), _vec(Ho)
    VI, VO = _lanes(I), _lanes(Ho)
    if Ho % (2 * VO) == 0 and not CB:
        VO = 2 * VO             # the down GEMM's accumulators: RB x 2 vectors, all independent (within a column block)
    byte_dot = bool(CB) and bool(s.bits)
    packed = bool(CB) and not s.bits            # f32 experts column-blocked: gemm.py's register tiles
    # Column blocks over a row-major [H, I] expert matrix stride through it (a TLB miss per row once it
    # outgrows the cache: 4 ms per call at H=1024, I=512); past STREAM_BYTES walk it row by row instead.
    stream = H * I * 4 > STREAM_BYTES and not CB     # column-blocked codes are contiguous per column block
    GW, DW = (I, Ho) if stream else (VI, VO)
    TR = PACKED_RB if packed else STREAM_RB if stream else RB      # rows per tile
    MB = tile_rows(CB, vector_lanes()) if packed else 1
    T1, T2 = TAIL_ROWS
    flip = s.fmt == "int"
    L16 = int_dot.LANES
    RG = int_dot.rows_per_group(s.bits) if CB else 0
    PF_ROWS = PREFETCH_BYTES // L16
    # columns per pass over an expert's rows (a pass reads CG or CD x 16 bytes of each row), as many as keep the
    # int32 sums in registers: gate and up 2 x CG x DIGITS, down CD x DIGITS
    CG = 2 if I % (2 * L16) == 0 else 1
    CD = 4 if Ho % (4 * L16) == 0 else (2 if Ho % (2 * L16) == 0 else 1)
    KMAX = max(H, I)

    RB_SHAPE, BI_SHAPE, BO_SHAPE = ((E,) if s.router_bias else (1,)), ((E, I) if s.biases else (1,)), \
        ((E, Ho) if s.biases else (1,))

    def act(gv, uv, e, i, bg, bu):
        """act(g + b_gate) * (clamp(u + b_up) + up_offset) of one element."""
        if s.biases:
            gv, uv = gv + bg[e, i], uv + bu[e, i]
        return activation(s.act, gv, s.clamp, s.alpha) * clamp_up(uv, s.clamp, s.up_offset)

    def logit(v, rb, e):
        """A router logit plus the router bias."""
        return v + rb[e] if s.router_bias else v

    def down_biased(dv, e, o, w, bd):
        """One output element of an expert's down GEMM (rows already weighted by w) plus w * b_down."""
        return dv + w * bd[e, o] if s.biases else dv

    def at(a, e, row, col):
        """Element [e, row, col] of an expert array ([E, X, N]), as bound (column-blocked with CB)."""
        return a[e, col // CB, row, col % CB] if CB else a[e, row, col]

    def wv(w, sc, e, kq, p, col):
        """Expert weight [e, k = kq * PB + p, col] as float32: a cast, or its code decoded and scaled."""
        if not s.bits:
            return T.Cast(f32, w[e, kq, col])
        return value(at(w, e, kq, col), s.bits, s.fmt, high=p == 1, centred=True) \
            * at(sc, e, (kq * PB + p) // s.block, col)

    @T.macro
    def gate_up_regs(xs, wg, wu, sg, su, g, u, e, ic, hq, p):
        for r in T.unroll(RB):
            for v in T.vectorized(VI):
                g[r, v] = g[r, v] + xs[r, hq * PB + p] * wv(wg, sg, e, hq, p, ic * VI + v)
                u[r, v] = u[r, v] + xs[r, hq * PB + p] * wv(wu, su, e, hq, p, ic * VI + v)

    @T.macro
    def down_regs(hid, wd, sd, d, e, oc, iq, p):
        for r in T.unroll(RB):
            for v in T.vectorized(VO):
                d[r, v] = d[r, v] + hid[r, iq * PB + p] * wv(wd, sd, e, iq, p, oc * VO + v)

    @T.macro
    def gate_up_stream(xs, wg, wu, sg, su, g, u, e, nr, hq, p):
        for ic in range(I // VI):
            for r in range(nr):
                for v in T.vectorized(VI):
                    g[r, ic * VI + v] = g[r, ic * VI + v] + xs[r, hq * PB + p] * wv(wg, sg, e, hq, p, ic * VI + v)
                    u[r, ic * VI + v] = u[r, ic * VI + v] + xs[r, hq * PB + p] * wv(wu, su, e, hq, p, ic * VI + v)

    @T.macro
    def down_stream(hid, wd, sd, d, e, nr, iq, p):
        for oc in range(Ho // VO):
            for r in range(nr):
                for v in T.vectorized(VO):
                    d[r, oc * VO + v] = d[r, oc * VO + v] + hid[r, iq * PB + p] * wv(wd, sd, e, iq, p, oc * VO + v)

    @T.macro
    def router_logits(n, x, rw, rb, lg):
        """lg = x @ router_w, RB tokens at a time (RB independent accumulator chains)."""
        for tb in range((n + (RB - 1)) // RB):
            acc = T.alloc_local((RB, E), f32)
            for r in T.unroll(RB):
                for e in loop_e(E):
                    acc[r, e] = T.float32(0)
            for h in range(H):
                for r in T.unroll(RB):
                    for e in loop_e(E):
                        acc[r, e] = acc[r, e] + T.Cast(f32, x[T.min(tb * RB + r, n - 1), h]) * T.Cast(f32, rw[h, e])
            for r in range(T.min(n - tb * RB, RB)):
                for e in loop_e(E):
                    lg[tb * RB + r, e] = logit(acc[r, e], rb, e)

    @T.macro
    def scores_of(lg, t, sc):
        """sc[e] = scoring(logits[t, e])."""
        for e in loop_e(E):
            sc[e] = lg[t, e]
        if s.scoring == "softmax":
            mx = T.alloc_local((1,), f32)
            tot = T.alloc_local((1,), f32)
            mx[0] = sc[0]
            for e in range(1, E):
                mx[0] = T.max(mx[0], sc[e])
            tot[0] = T.float32(0)
            for e in range(E):
                sc[e] = T.exp(sc[e] - mx[0])
                tot[0] = tot[0] + sc[e]
            for e in range(E):
                sc[e] = sc[e] / tot[0]
        elif s.scoring == "sigmoid":
            for e in range(E):
                sc[e] = T.float32(1) / (T.float32(1) + T.exp(T.float32(0) - sc[e]))
        else:    # sqrtsoftplus, exp clamped where softplus(z) == z in f32
            for e in range(E):
                sc[e] = T.sqrt(T.if_then_else(sc[e] > T.float32(20), sc[e],
                                              T.log(T.exp(T.min(sc[e], T.float32(20))) + T.float32(1))))

    @T.macro
    def argmax_untaken(vals, taken, n, best, at):
        """at[0] = the first index < n of the largest vals[i] with taken[i] == 0; marks it taken."""
        at[0] = T.int64(-1)
        best[0] = T.float32(NEG_INF)
        for i in range(n):
            if taken[i] == 0 and (at[0] < 0 or vals[i] > best[0]):
                at[0] = T.int64(i)
                best[0] = vals[i]
        taken[at[0]] = 1

    @T.macro
    def select_topk(sc, bias, t, idx):
        """idx[t, :] = top_k of (scores + bias), restricted to the best topk_group groups."""
        ch = T.alloc_local((E,), f32)
        taken = T.alloc_local((E,), "int32")
        best = T.alloc_local((1,), f32)
        at = T.alloc_local((1,), "int64")
        for e in range(E):
            ch[e] = sc[e] + T.Cast(f32, bias[e])
            taken[e] = 0
        if G > 1:
            gsc = T.alloc_local((G,), f32)
            gtaken = T.alloc_local((G,), "int32")
            top = T.alloc_local((2,), f32)
            for g in range(G):
                top[0] = T.float32(NEG_INF)
                top[1] = T.float32(NEG_INF)
                for j in range(GS):
                    if ch[g * GS + j] > top[0]:
                        top[1] = top[0]
                        top[0] = ch[g * GS + j]
                    elif ch[g * GS + j] > top[1]:
                        top[1] = ch[g * GS + j]
                if GS > 1:
                    gsc[g] = top[0] + top[1]
                else:
                    gsc[g] = top[0]
                gtaken[g] = 0
            for _r in range(s.topk_group):
                argmax_untaken(gsc, gtaken, G, best, at)
            for e in range(E):
                if gtaken[e // GS] == 0:
                    ch[e] = T.float32(NEG_INF)
        for k in range(K):
            argmax_untaken(ch, taken, E, best, at)
            idx[t * K + k] = at[0]

    @T.macro
    def sparsemixer(lg, t, idx, wt):
        """idx[t, :], wt[t, :] = PhiMoE's two picks: each the first argmax of the logits left, weighed by
        1 / sum exp(z - max) over the logits left with (max - z) <= 2 eps max(|z|, max) (the reference's
        division, multiplied out: 0 / 0 keeps a logit there too)."""
        left = T.alloc_local((E,), f32)
        st = T.alloc_local((2,), f32)           # max, denominator
        at = T.alloc_local((1,), "int64")
        for e in range(E):
            left[e] = lg[t, e]
        for k in range(2):
            at[0] = T.int64(0)
            st[0] = left[0]
            for e in range(1, E):
                if left[e] > st[0]:
                    st[0] = left[e]
                    at[0] = T.int64(e)
            st[1] = T.float32(0)
            for e in range(E):
                band = st[0] - lg[t, e] <= T.float32(2 * s.jitter_eps) * T.max(T.abs(lg[t, e]), st[0])
                st[1] = st[1] + T.Select(band, T.exp(left[e] - st[0]), T.float32(0))
            idx[t * K + k] = at[0]
            wt[t * K + k] = T.float32(s.scaling) / st[1]
            left[at[0]] = T.float32(NEG_INF)

    @T.macro
    def weights_of(sc, t, idx, wt):
        """wt[t, :] = scores at the chosen experts, renormalised and scaled."""
        tot = T.alloc_local((1,), f32)
        tot[0] = T.float32(0)
        for k in range(K):
            wt[t * K + k] = sc[idx[t * K + k]]
            tot[0] = tot[0] + wt[t * K + k]
        for k in range(K):
            if s.renormalize:
                wt[t * K + k] = wt[t * K + k] / (tot[0] + T.float32(1e-20)) * T.float32(s.scaling)
            else:
                wt[t * K + k] = wt[t * K + k] * T.float32(s.scaling)

    @T.macro
    def group(n, idx, wt, off, rows, pw, pos, tile_e, tile_p, ntiles):
        """Counting sort of the pairs p = t * K + k by expert (stable: token order within an expert)."""
        for e in range(E + 1):
            off[e] = T.int64(0)
        for p in range(n * K):
            off[idx[p] + 1] = off[idx[p] + 1] + 1
        for e in range(E):
            off[e + 1] = off[e + 1] + off[e]
        for p in range(n * K):      # off[e] doubles as expert e's cursor, then shifts back
            rows[off[idx[p]]] = p // K
            pw[off[idx[p]]] = wt[p]
            pos[p] = off[idx[p]]
            off[idx[p]] = off[idx[p]] + 1
        for e in range(E):
            off[E - e] = off[E - 1 - e]
        off[0] = T.int64(0)
        ntiles[0] = T.int64(0)
        for e in range(E):
            for j in range((off[e + 1] - off[e] + (TR - 1)) // TR):
                tile_e[ntiles[0]] = T.int64(e)
                tile_p[ntiles[0]] = off[e] + j * TR
                ntiles[0] = ntiles[0] + 1

    @T.macro
    def tile_regs(j, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn, xs, hid, g, u, d):
        """Accumulators are RB x one or two vectors: with r unrolled they live in registers."""
        e = tile_e[j]
        p0 = tile_p[j]
        nr = T.min(off[e + 1] - p0, T.int64(RB))
        for r in range(RB):             # rows past nr repeat the last row: no branch in the inner loops
            for h in range(H):
                xs[r, h] = T.Cast(f32, x[rows[p0 + T.min(r, nr - 1)], h])
        for ic in range(I // VI):
            for r in T.unroll(RB):
                for v in T.vectorized(VI):
                    g[r, v] = T.float32(0)
                    u[r, v] = T.float32(0)
            for hq in range(HQ):
                gate_up_regs(xs, wg, wu, sg, su, g, u, e, ic, hq, 0)
                if PB == 2:
                    gate_up_regs(xs, wg, wu, sg, su, g, u, e, ic, hq, 1)
            for r in T.unroll(RB):
                for v in T.vectorized(VI):
                    hid[r, ic * VI + v] = act(g[r, v], u[r, v], e, ic * VI + v, bg, bu) * pw[p0 + T.min(r, nr - 1)]
        for oc in range(Ho // VO):
            for r in T.unroll(RB):
                for v in T.vectorized(VO):
                    d[r, v] = T.float32(0)
            for iq in range(IQ):
                down_regs(hid, wd, sd, d, e, oc, iq, 0)
                if PB == 2:
                    down_regs(hid, wd, sd, d, e, oc, iq, 1)
            for r in range(nr):
                for v in T.vectorized(VO):
                    dn[p0 + r, oc * VO + v] = down_biased(d[r, v], e, oc * VO + v, pw[p0 + r], bd)

    @T.macro
    def gather_rows(x, rows, p0, nr, xs):
        """xs[r] = x[rows[p0 + r]] as float32, for the tile's nr rows."""
        for r in range(nr):
            for h in range(H):
                xs[r, h] = T.Cast(f32, x[rows[p0 + r], h])

    @T.macro
    def tile_stream(j, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn, xs, hid, g, u, d):
        """For experts too big for cache: walk each weight matrix once, row by row (contiguous, so the
        prefetcher streams it), accumulating whole rows of g/u/d in L1; only the tile's nr real rows."""
        e = tile_e[j]
        p0 = tile_p[j]
        nr = T.min(off[e + 1] - p0, T.int64(TR))
        gather_rows(x, rows, p0, nr, xs)
        for r in range(nr):
            for i in range(I):
                g[r, i] = T.float32(0)
                u[r, i] = T.float32(0)
            for o in range(Ho):
                d[r, o] = T.float32(0)
        for hq in range(HQ):
            gate_up_stream(xs, wg, wu, sg, su, g, u, e, nr, hq, 0)
            if PB == 2:
                gate_up_stream(xs, wg, wu, sg, su, g, u, e, nr, hq, 1)
        for r in range(nr):
            for ic in range(I // VI):
                for v in T.vectorized(VI):
                    hid[r, ic * VI + v] = act(g[r, ic * VI + v], u[r, ic * VI + v], e, ic * VI + v, bg, bu) \
                        * pw[p0 + r]
        for iq in range(IQ):
            down_stream(hid, wd, sd, d, e, nr, iq, 0)
            if PB == 2:
                down_stream(hid, wd, sd, d, e, nr, iq, 1)
        for r in range(nr):
            for oc in range(Ho // VO):
                for v in T.vectorized(VO):
                    dn[p0 + r, oc * VO + v] = down_biased(d[r, oc * VO + v], e, oc * VO + v, pw[p0 + r], bd)

    def codes(w, e, k, col):
        """Expert e's codes of k .. k + 3 for the 16 columns from col (a column block), as int_dot.code_bytes."""
        return int_dot.code_bytes([w[e, col // L16, k // PB + r, T.Ramp(0, 1, L16)] for r in range(RG)], s.bits, flip)

    @T.macro
    def tile_bytes(j, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn, hid, dig, sx, vs):
        """A tile of few rows as byte dot products (int_dot.py), a row at a time: the gate / up GEMVs 16
        columns at a time (their 2 x DIGITS int32 sums independent), then the down GEMV over the quantized
        activated row (CHAINS sums per digit)."""
        e = tile_e[j]
        p0 = tile_p[j]
        for r in range(T.min(off[e + 1] - p0, T.int64(TR))):
            int_dot.quantize_row(x, rows[p0 + r], H, s.block, dig, 0, sx, vs)
            for ic in range(I // (L16 * CG)):
                acc = T.alloc_local((2, CG, L16), f32)
                ds = T.alloc_local((2, CG, int_dot.DIGITS, L16), "int32")
                for m, cb, v in T.grid(2, CG, L16):
                    acc[m, cb, v] = T.float32(0)
                for kb in range(H // s.block):
                    for m, cb, d, v in T.grid(2, CG, int_dot.DIGITS, L16):
                        ds[m, cb, d, v] = 0
                    for g in range(s.block // 4):
                        for cb in T.unroll(CG):
                            prefetch(wg[e, ic * CG + cb, (kb * s.block + g * 4) // PB + PF_ROWS, 0])
                            prefetch(wu[e, ic * CG + cb, (kb * s.block + g * 4) // PB + PF_ROWS, 0])
                            for d in T.unroll(int_dot.DIGITS):
                                ds[0, cb, d, T.Ramp(0, 1, L16)] = int_dot.dot(
                                    ds[0, cb, d, T.Ramp(0, 1, L16)],
                                    codes(wg, e, kb * s.block + g * 4, (ic * CG + cb) * L16),
                                    int_dot.digits4(dig, 0, d, kb * s.block + g * 4))
                                ds[1, cb, d, T.Ramp(0, 1, L16)] = int_dot.dot(
                                    ds[1, cb, d, T.Ramp(0, 1, L16)],
                                    codes(wu, e, kb * s.block + g * 4, (ic * CG + cb) * L16),
                                    int_dot.digits4(dig, 0, d, kb * s.block + g * 4))
                    for cb in T.unroll(CG):
                        for v in T.vectorized(L16):
                            acc[0, cb, v] = acc[0, cb, v] + int_dot.block_value(
                                ds[0, cb, 0, v], ds[0, cb, 1, v], ds[0, cb, 2, v], vs[0, kb], sx[0, kb], s.bits) \
                                * at(sg, e, kb, (ic * CG + cb) * L16 + v)
                            acc[1, cb, v] = acc[1, cb, v] + int_dot.block_value(
                                ds[1, cb, 0, v], ds[1, cb, 1, v], ds[1, cb, 2, v], vs[0, kb], sx[0, kb], s.bits) \
                                * at(su, e, kb, (ic * CG + cb) * L16 + v)
                for cb in T.unroll(CG):
                    for v in T.vectorized(L16):
                        hid[0, (ic * CG + cb) * L16 + v] = act(acc[0, cb, v], acc[1, cb, v], e, (ic * CG + cb) * L16 + v,
                                                               bg, bu) * pw[p0 + r]
            int_dot.quantize_row(hid, 0, I, s.block, dig, 0, sx, vs)
            for oc in range(Ho // (L16 * CD)):
                dacc = T.alloc_local((CD, L16), f32)
                dds = T.alloc_local((CD, int_dot.DIGITS, L16), "int32")
                for cb, v in T.grid(CD, L16):
                    dacc[cb, v] = T.float32(0)
                for kb in range(I // s.block):
                    for cb, d, v in T.grid(CD, int_dot.DIGITS, L16):
                        dds[cb, d, v] = 0
                    for g in range(s.block // 4):
                        for cb in T.unroll(CD):
                            prefetch(wd[e, oc * CD + cb, (kb * s.block + g * 4) // PB + PF_ROWS, 0])
                            for d in T.unroll(int_dot.DIGITS):
                                dds[cb, d, T.Ramp(0, 1, L16)] = int_dot.dot(
                                    dds[cb, d, T.Ramp(0, 1, L16)],
                                    codes(wd, e, kb * s.block + g * 4, (oc * CD + cb) * L16),
                                    int_dot.digits4(dig, 0, d, kb * s.block + g * 4))
                    for cb in T.unroll(CD):
                        for v in T.vectorized(L16):
                            dacc[cb, v] = dacc[cb, v] + int_dot.block_value(
                                dds[cb, 0, v], dds[cb, 1, v], dds[cb, 2, v], vs[0, kb], sx[0, kb], s.bits) \
                                * at(sd, e, kb, (oc * CD + cb) * L16 + v)
                for cb in T.unroll(CD):
                    for v in T.vectorized(L16):
                        dn[p0 + r, (oc * CD + cb) * L16 + v] = down_biased(dacc[cb, v], e, (oc * CD + cb) * L16 + v,
                                                                           pw[p0 + r], bd)

    @T.macro
    def packed_acc(a, w, acc, e, jo, r0, rows, kdim):
        """acc[:rows] = a[r0 : r0 + rows] @ W[e][:, jo-th column block]: per k one load of the block's CB weights
        serves `rows` rows (gemm.py's tile: MB x CB accumulators in registers). Prefetching the next block into
        L2 from a block's first tile, as gemm.py does, made qwen3_moe_700m's experts slower (128 tokens: 15.7 ->
        17.8 ms)."""
        for ii, jj in T.grid(rows, CB):
            acc[ii, jj] = T.float32(0)
        for kk in range(kdim):
            for ii in T.unroll(rows):
                for jj in T.vectorized(CB):
                    acc[ii, jj] = acc[ii, jj] + a[r0 + ii, kk] * w[e, jo, kk, jj]

    @T.macro
    def packed_rows(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, acc, gate, e, p0, jo, r0, rows, down):
        """Rows r0 .. r0 + rows of a tile, column block jo: of hid = act(xs Wg) * (xs Wu) * routing weight, or
        (`down`) of dn = hid Wd."""
        if down:
            packed_acc(hid, wd, acc, e, jo, r0, rows, I)
            for ii in T.unroll(rows):
                for jj in T.vectorized(CB):
                    dn[p0 + r0 + ii, jo * CB + jj] = down_biased(acc[ii, jj], e, jo * CB + jj, pw[p0 + r0 + ii], bd)
        else:
            packed_acc(xs, wg, acc, e, jo, r0, rows, H)
            for ii, jj in T.grid(rows, CB):
                gate[ii, jj] = acc[ii, jj]
            packed_acc(xs, wu, acc, e, jo, r0, rows, H)
            for ii in T.unroll(rows):
                for jj in T.vectorized(CB):
                    hid[r0 + ii, jo * CB + jj] = act(gate[ii, jj], acc[ii, jj], e, jo * CB + jj, bg, bu) \
                        * pw[p0 + r0 + ii]

    @T.macro
    def packed_blocks(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, e, p0, nr, blocks, down):
        """Each column block's rows in tiles of MB, then of TAIL_ROWS, then one at a time: the block's weights
        come from memory for the first tile and from L2 for the rest."""
        acc = T.alloc_local((MB, CB), f32)
        gate = T.alloc_local((MB, CB), f32)
        tiles_n = whole_tiles(nr, MB)
        whole = tiles_n * MB
        for jo in range(blocks):
            for io in range(tiles_n):
                packed_rows(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, acc, gate, e, p0, jo, io * MB, MB, down)
            if T1 < MB:
                for io in range((nr - whole) // T1):
                    packed_rows(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, acc, gate, e, p0, jo, whole + io * T1, T1,
                                down)
            if T2 < MB:
                for io in range((nr - rows_past(nr, whole, T1, MB)) // T2):
                    packed_rows(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, acc, gate, e, p0, jo,
                                rows_past(nr, whole, T1, MB) + io * T2, T2, down)
            for r in range(rows_past(nr, rows_past(nr, whole, T1, MB), T2, MB), nr):
                packed_rows(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, acc, gate, e, p0, jo, r, 1, down)

    @T.macro
    def tile_packed(j, x, wg, wu, wd, bg, bu, bd, off, rows, pw, tile_e, tile_p, dn, xs, hid):
        """Up to PACKED_RB rows of one expert over its column-blocked f32 weights: gather the rows, then the
        gate / up GEMM and the down GEMM as register tiles."""
        e = tile_e[j]
        p0 = tile_p[j]
        nr = T.min(off[e + 1] - p0, T.int64(TR))
        gather_rows(x, rows, p0, nr, xs)
        packed_blocks(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, e, p0, nr, I // CB, False)
        packed_blocks(xs, hid, wg, wu, wd, bg, bu, bd, pw, dn, e, p0, nr, Ho // CB, True)

    @T.macro
    def any_tile(j, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn, xs, hid, g, u, d):
        if packed:
            tile_packed(j, x, wg, wu, wd, bg, bu, bd, off, rows, pw, tile_e, tile_p, dn, xs, hid)
        elif stream:
            tile_stream(j, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn, xs, hid, g, u, d)
        else:
            tile_regs(j, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn, xs, hid, g, u, d)

    @T.macro
    def tiles(first, count, step, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn):
        """Tiles first, first + step, ... (count of them); one tile: rows tile_p[j] .. (at most TR, all
        of expert tile_e[j]) -> dn[p] = weight * expert(x[rows[p]]). The scratch is allocated once
        per call of this (inside a parallel loop, once per chunk: not per tile)."""
        xs = T.alloc_local((TR, H), f32)
        hid = T.alloc_local((TR, I), f32)
        g = T.alloc_local((TR, GW), f32)
        u = T.alloc_local((TR, GW), f32)
        d = T.alloc_local((TR, DW), f32)
        dig = T.alloc_buffer((1, int_dot.DIGITS, KMAX if byte_dot else 4), "int8")
        sx = T.alloc_buffer((1, KMAX // s.block if byte_dot else 1), f32)
        vs = T.alloc_buffer((1, KMAX // s.block if byte_dot else 1), f32)
        for jj in range(count):
            if byte_dot:
                if off[tile_e[first + jj * step] + 1] - tile_p[first + jj * step] <= BYTE_DOT_ROWS:
                    tile_bytes(first + jj * step, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e,
                               tile_p, dn, hid, dig, sx, vs)
                else:
                    any_tile(first + jj * step, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p,
                             dn, xs, hid, g, u, d)
            else:
                any_tile(first + jj * step, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p,
                         dn, xs, hid, g, u, d)

    @T.macro
    def experts_and_combine(n, x, wg, wu, wd, bg, bu, bd, sg, su, sd, idx, wt, y):
        off = T.alloc_buffer((E + 1,), "int64")
        rows = T.alloc_buffer((n * K,), "int64")
        pw = T.alloc_buffer((n * K,), f32)
        pos = T.alloc_buffer((n * K,), "int64")
        tile_e = T.alloc_buffer((n * K + E,), "int64")
        tile_p = T.alloc_buffer((n * K + E,), "int64")
        ntiles = T.alloc_buffer((1,), "int64")
        dn = T.alloc_buffer((n * K, Ho), f32)
        group(n, idx, wt, off, rows, pw, pos, tile_e, tile_p, ntiles)
        # interleaved chunks balance the experts' tails; one token's K experts stream (parallel.py)
        if streams or n * (K * macs_per_row) >= PARALLEL_MIN_MACS:
            for c in T.parallel(T.min(ntiles[0], CHUNKS)):
                tiles(c, (ntiles[0] - c + T.min(ntiles[0], CHUNKS) - 1) // T.min(ntiles[0], CHUNKS),
                      T.min(ntiles[0], CHUNKS), x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p,
                      dn)
        else:
            tiles(0, ntiles[0], 1, x, wg, wu, wd, bg, bu, bd, sg, su, sd, off, rows, pw, tile_e, tile_p, dn)
        for t in range(n):
            acc = T.alloc_local((Ho,), f32)
            for o in loop_o(Ho):
                acc[o] = dn[pos[t * K], o]
            for k in range(1, K):
                for o in loop_o(Ho):
                    acc[o] = acc[o] + dn[pos[t * K + k], o]
            for o in loop_o(Ho):
                y[t, o] = T.Cast(xdt, acc[o])

    if s.hash_vocab:
        @T.prim_func(private=True)
        def moe_hash(x_h: T.handle, rw: T.Buffer((H, E), rdt), table: T.Buffer((V, K), tdt), tok_h: T.handle,
                     wg: T.Buffer(g_codes, qdt), wu: T.Buffer(g_codes, qdt), wd: T.Buffer(d_codes, qdt),
                     rb: T.Buffer(RB_SHAPE, f32), bg: T.Buffer(BI_SHAPE, f32), bu: T.Buffer(BI_SHAPE, f32),
                     bd: T.Buffer(BO_SHAPE, f32), sg: T.Buffer(g_scales, f32), su: T.Buffer(g_scales, f32),
                     sd: T.Buffer(d_scales, f32), y_h: T.handle):
            T.func_attr({"op_pattern": 8, "tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n, H), xdt)
            tok = T.match_buffer(tok_h, (n,), "int64")
            y = T.match_buffer(y_h, (n, Ho), xdt)
            idx = T.alloc_buffer((n * K,), "int64")
            wt = T.alloc_buffer((n * K,), f32)
            lg = T.alloc_buffer((n, E), f32)
            router_logits(n, x, rw, rb, lg)
            for t in range(n):
                sc = T.alloc_local((E,), f32)
                scores_of(lg, t, sc)
                for k in range(K):      # ids are checked at the feeds, entries at import; the mod only guards memory
                    idx[t * K + k] = T.Cast("int64", table[T.floormod(tok[t], V), k])
                weights_of(sc, t, idx, wt)
            experts_and_combine(n, x, wg, wu, wd, bg, bu, bd, sg, su, sd, idx, wt, y)
        return moe_hash

    @T.prim_func(private=True)
    def moe_topk(x_h: T.handle, rw: T.Buffer((H, E), rdt), bias: T.Buffer((E,), "float32"),
                 wg: T.Buffer(g_codes, qdt), wu: T.Buffer(g_codes, qdt), wd: T.Buffer(d_codes, qdt),
                 rb: T.Buffer(RB_SHAPE, f32), bg: T.Buffer(BI_SHAPE, f32), bu: T.Buffer(BI_SHAPE, f32),
                 bd: T.Buffer(BO_SHAPE, f32), sg: T.Buffer(g_scales, f32), su: T.Buffer(g_scales, f32),
                 sd: T.Buffer(d_scales, f32), y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(x_h, (n, H), xdt)
        y = T.match_buffer(y_h, (n, Ho), xdt)
        idx = T.alloc_buffer((n * K,), "int64")
        wt = T.alloc_buffer((n * K,), f32)
        lg = T.alloc_buffer((n, E), f32)
        router_logits(n, x, rw, rb, lg)
        for t in range(n):
            if s.routing == "sparsemixer":
                sparsemixer(lg, t, idx, wt)
            else:
                sc = T.alloc_local((E,), f32)
                scores_of(lg, t, sc)
                select_topk(sc, bias, t, idx)
                weights_of(sc, t, idx, wt)
        experts_and_combine(n, x, wg, wu, wd, bg, bu, bd, sg, su, sd, idx, wt, y)
    return moe_topk

"""Dense layers over pre-packed weights as hand-scheduled TIR: y = x @ W, and GatedMLP's
h = act(x @ Wg) * (x @ Wu), with W bound as Wp[N / NB, K, NB] (Wp[jo, k, ji] = W[k, jo * NB + ji]).

Register blocking: an MB x NB tile of accumulators stays in registers across the whole K loop; per k
it loads NB contiguous weights once and reuses them for MB token rows. The tile fills half the
vector registers (isa.py): 12 of AVX2's 16 (3 x 32, 6 x 16, 12 x 8 floats), 24 of AVX-512's 32
(12 x 32, 24 x 16); the rest hold weights and a broadcast. The token count M is symbolic: whole
MB-row tiles first, then the remaining rows in tiles of 8, then 4 (TAIL_ROWS), then one at a time (no
predicate in the inner loop). A batch of 8 decode rows is thus one tile that reads its weights once;
as two 4-row tiles (without prefetch) it ran at 14 GB/s against a GEMV's 25 (K 1536, N 4096, weights
from DRAM: 1.75 -> 1.05 ms). Tail tiles with no whole tile before them prefetch their weights like a
GEMV row; after a whole tile the weights are in L2. Column blocks run in parallel when M * K * N is
big enough (parallel.py: tested at run time, M is symbolic).

The same tiles serve per-head products out[b, h] = x[b, h] @ W[h] against a constant [H, K, N]
(MLA's absorbed decode, passes/derive_generation.py): each head's W[h] is packed the same way,
Wp[h, jo, k, ji], the rows (b, s) flatten into M = B * S, and (head, column block) pairs run in
parallel by the same thresholds.
"""
from __future__ import annotations

import functools

import tvm
from tvm import tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from .prefetch import LINE_BYTES, PREFETCH_BYTES, prefetch
from . import amx, isa
from .isa import vector_lanes
from .mlp import activation, clamp_up
from .parallel import PARALLEL_MIN_MACS, PARALLEL_MIN_STREAM_BYTES

ACC_VECTORS = 12            # accumulator ymm registers per tile; the rest hold weights and a broadcast
TAIL_ROWS = (8, 4)          # the rows past the last whole tile go in tiles this high, then one at a time
MIN_ROWS_SPLIT = 3          # whole tiles from which whole_tiles gives one up to the tail tiles; below, a few
                            # rows that a tail height divides run as whole tiles of it (short_tiles in _packed_func)
WARM_TILES = 4              # a column block's last whole tiles prefetch the next block's weights, a share each


def _singles(r: int, mb: int) -> int:
    """Of r rows past the whole tiles, those left to single-row tiles after the TAIL_ROWS tiles below mb."""
    for t in TAIL_ROWS:
        if t < mb:
            r %= t
    return r


def whole_tiles(m, mb: int):
    """How many whole mb-row tiles m rows (an int64 expression) take: m // mb, one fewer where the rows left plus
    that tile split into TAIL_ROWS tiles with fewer single rows. A single row's two accumulators wait on the FMA
    latency: on AVX2 (6-row tiles) 128 rows run as 20 x 6 + 2 x 4, not 21 x 6 + 2 x 1 (a 128 x 1536 x 4096 gated
    GEMM 19.2 -> 18.6 ms; qwen3_moe_700m's experts at 128 tokens 14.4 -> 13.5 ms). From MIN_ROWS_SPLIT tiles."""
    n = m // mb
    drop = [r for r in range(1, mb) if _singles(r + mb, mb) < _singles(r, mb)]
    if not drop:
        return n
    left = functools.reduce(tirx.Or, [m % mb == r for r in drop])
    return n - tirx.Select(tirx.And(left, m >= MIN_ROWS_SPLIT * mb), tirx.const(1, "int64"), tirx.const(0, "int64"))


def rows_past(m, start, tb: int, mb: int):
    """The first of m rows after the tiles of tb rows from `start` (none where tb is not below the whole
    tile's mb rows: those rows went in whole tiles)."""
    return start + (m - start) // tb * tb if tb < mb else start


def tile_rows(nb: int, lanes: int = 8) -> int:
    """MB for column blocks of nb floats, with vectors of `lanes` floats (8: AVX2, 16: AVX-512; half
    the registers of either accumulate)."""
    return max(1, ACC_VECTORS * lanes // 8 // max(1, -(-nb // lanes)))


@cached_kernel
def dense_packed_func(k: int, no: int, nb: int, dtype: str = "float32", gated: bool = False,
                      act: str = "silu", clamp: float = 0.0, rows: int = 0):
    """PrimFunc dense(x [M, K], wp [NO, K, NB], out [M, NO * NB]), or with `gated`
    gate_up(x, wgp, wup, out): out = act(x Wg) * clamp_up(x Wu). `rows`: MB (0: this build's
    tile_rows)."""
    return _packed_func(0, k, no, nb, dtype, gated, act, clamp, rows)


@cached_kernel
def per_head_packed_func(heads: int, k: int, no: int, nb: int, dtype: str = "float32", rows: int = 0):
    """PrimFunc per_head(x [B, H, S, K], wp [H, NO, K, NB], out [B, H, S, NO * NB]):
    out[b, h] = x[b, h] @ W[h], W [H, K, NO * NB] packed per head. `rows`: MB (0: tile_rows)."""
    return _packed_func(heads, k, no, nb, dtype, False, "silu", 0.0, rows)


def _packed_func(heads: int, k: int, no: int, nb: int, dtype: str, gated: bool, act: str, clamp: float,
                 rows: int):
    """heads 0: x [M, K], w [NO, K, NB], out [M, N]; else x [B, H, S, K], w [H, NO, K, NB],
    out [B, H, S, N] with row m = (m // S, m % S) and head `hd`."""
    K, NO, NB = k, no, nb
    MB = rows or tile_rows(nb, vector_lanes())
    T1, T2 = TAIL_ROWS
    ELEM_BYTES = tvm.DataType(dtype).bits // 8
    PF_ROWS = max(1, PREFETCH_BYTES // (NB * ELEM_BYTES))    # weight rows (one per k) ahead
    zero = tirx.const(0.0, "float32")
    headed = heads > 0                     # a bool: TVMScript's `if` takes no int

    def x_at(X, row, hd, kk):
        if headed:
            return X[row // X.shape[2], hd, row % X.shape[2], kk]
        return X[row, kk]

    def w_at(W, hd, jo, kk, ji):
        return W[hd, jo, kk, ji] if headed else W[jo, kk, ji]

    LINES = max(1, NB * ELEM_BYTES // LINE_BYTES)            # cache lines per weight row
    warms = K % WARM_TILES == 0

    @T.macro
    def fma_row(X, W, acc, row0, rows, hd, jo, kk):
        for ii in T.unroll(rows):
            for ji in T.vectorized(T.int64(NB)):
                acc[ii, ji] = acc[ii, ji] + T.Cast("float32", x_at(X, row0 + ii, hd, kk)) * T.Cast(
                    "float32", w_at(W, hd, jo, kk, ji))

    @T.macro
    def accumulate(X, W, acc, row0, rows, hd, jo, ahead, warm):
        """`ahead` (one row: a GEMV streaming its weights from memory) prefetches them PREFETCH_BYTES ahead;
        `warm` (w of WARM_TILES) prefetches the w-th share of the next column block's weights into L2.
        Without it a block's first tile waited on DRAM: a 128 x 1536 x 4096 GEMM over weights not in
        cache ran at 288 GFLOP/s against 419 in cache; 361 with the prefetch. The last tiles issue it, not
        the first: the rows of x a block streams through L2 evicted lines fetched earlier (K = 4096:
        288 GFLOP/s prefetched in the first tiles, 310 in the last, 279 without)."""
        for ii, ji in T.grid(rows, T.int64(NB)):
            acc[ii, ji] = zero
        if warm is not None:
            for ko in range(T.int64(K // WARM_TILES)):
                for share, line in T.grid(warm[1], LINES):
                    prefetch(w_at(W, hd, jo + 1, (warm[0] + share) * T.int64(K // WARM_TILES) + ko,
                                  line * (LINE_BYTES // ELEM_BYTES)), level=2)
                for ki in T.unroll(WARM_TILES):
                    fma_row(X, W, acc, row0, rows, hd, jo, ko * T.int64(WARM_TILES) + ki)
        else:
            for kk in range(T.int64(K)):
                if ahead:
                    for line in range(LINES):
                        prefetch(w_at(W, hd, jo, kk + T.int64(PF_ROWS), line * (LINE_BYTES // ELEM_BYTES)))
                fma_row(X, W, acc, row0, rows, hd, jo, kk)

    SHORT = max([t for t in TAIL_ROWS if t < MB], default=0)        # 0: none (short_tiles is False)

    def short_tiles(M):
        """Whether M rows run as whole tiles of SHORT rows: a few rows (decode batches) that SHORT divides and
        MB does not, which MB-row tiles would leave to tail tiles and single rows that warm no next block. On
        AVX2 8 rows as 4 + 4 instead of 6 + 1 + 1 (each tile warming its share): K 4096 x N 1536 1.73 -> 1.17 ms,
        the gated K 1536 x N 4096 3.27 -> 2.23 ms, weights streamed from memory as in a decode step."""
        if not SHORT:
            return tirx.const(False, "bool")
        return tirx.all(M < T.int64(MIN_ROWS_SPLIT * MB), M % T.int64(SHORT) == 0, M % T.int64(MB) != 0)

    def warm_shares(io, tiles_m):
        """(first, count): the shares of the next column block whole tile io prefetches. The last WARM_TILES
        tiles take one each; with fewer whole tiles than WARM_TILES the first of them also takes the shares no
        tile is left for, so a few-row GEMM (decode batches) warms the whole next block, not its last shares
        (6 rows, the gated K 1536 x N 4096 over streamed weights: 3.02 -> 2.44 ms)."""
        hi = io + T.int64(WARM_TILES + 1) - tiles_m
        first = T.Select(io == T.max(tiles_m - T.int64(WARM_TILES), T.int64(0)), T.int64(0), hi - T.int64(1))
        return first, hi - first

    @T.macro
    def store(O, acc, gate, row0, rows, hd, jo):
        for ii in T.unroll(rows):
            for ji in T.vectorized(T.int64(NB)):
                if gated:
                    O[row0 + ii, jo * T.int64(NB) + ji] = T.Cast(
                        dtype, activation(act, gate[ii, ji], clamp) * clamp_up(acc[ii, ji], clamp))
                elif headed:
                    O[(row0 + ii) // O.shape[2], hd, (row0 + ii) % O.shape[2], jo * T.int64(NB) + ji] = T.Cast(
                        dtype, acc[ii, ji])
                else:
                    O[row0 + ii, jo * T.int64(NB) + ji] = T.Cast(dtype, acc[ii, ji])

    @T.macro
    def tile(X, WG, WU, O, acc, gate, row0, rows, hd, jo, ahead=False, warm=None):
        if gated:
            accumulate(X, WG, acc, row0, rows, hd, jo, ahead, warm)
            for ii, ji in T.grid(rows, T.int64(NB)):
                gate[ii, ji] = acc[ii, ji]
            accumulate(X, WU, acc, row0, rows, hd, jo, ahead, warm)
        else:
            accumulate(X, WG, acc, row0, rows, hd, jo, ahead, warm)
        store(O, acc, gate, row0, rows, hd, jo)

    @T.macro
    def tail_tiles(X, WG, WU, O, acc, gate, M, hd, jo, whole, ahead):
        """The rows past the whole tiles in tiles of T1, then T2 rows (TAIL_ROWS)."""
        if T1 < MB:
            for io in range((M - whole) // T.int64(T1)):
                tile(X, WG, WU, O, acc, gate, whole + io * T.int64(T1), T.int64(T1), hd, jo, ahead)
        if T2 < MB:
            for io in range((M - rows_past(M, whole, T1, MB)) // T.int64(T2)):
                tile(X, WG, WU, O, acc, gate, rows_past(M, whole, T1, MB) + io * T.int64(T2), T.int64(T2), hd, jo,
                     ahead)

    @T.macro
    def whole_tile_rows(X, WG, WU, O, acc, gate, hd, jo, tiles_m, mb):
        for io in range(tiles_m):
            if warms and io + T.int64(WARM_TILES) >= tiles_m:       # the last whole tiles
                tile(X, WG, WU, O, acc, gate, io * T.int64(mb), T.int64(mb), hd, jo, False,
                     warm_shares(io, tiles_m))
            else:
                tile(X, WG, WU, O, acc, gate, io * T.int64(mb), T.int64(mb), hd, jo)

    @T.macro
    def column_block(X, WG, WU, O, M, hd, jo):
        acc = T.alloc_buffer((MB, NB), "float32", scope="local")
        gate = T.alloc_buffer((MB if gated else 1, NB), "float32", scope="local")
        if short_tiles(M):
            whole_tile_rows(X, WG, WU, O, acc, gate, hd, jo, M // T.int64(max(SHORT, 1)), SHORT)
        else:
            tiles_m = whole_tiles(M, MB)
            whole = tiles_m * T.int64(MB)
            whole_tile_rows(X, WG, WU, O, acc, gate, hd, jo, tiles_m, MB)
            if tiles_m == 0:             # the tail tiles are the block's first pass over its weights: prefetch them
                tail_tiles(X, WG, WU, O, acc, gate, M, hd, jo, whole, True)
            else:
                tail_tiles(X, WG, WU, O, acc, gate, M, hd, jo, whole, False)
            for i in range(rows_past(M, rows_past(M, whole, T1, MB), T2, MB), M):
                tile(X, WG, WU, O, acc, gate, i, T.int64(1), hd, jo, True)

    blocks = max(heads, 1) * NO           # (head, column block) pairs: the parallel loop

    def split(blk):                        # -> (head, column block)
        return (blk // T.int64(NO), blk % T.int64(NO)) if headed else (0, blk)

    weights = blocks * K * NB * (2 if gated else 1)
    streams = weights * tvm.DataType(dtype).bits // 8 >= PARALLEL_MIN_STREAM_BYTES   # parallel at any M (parallel.py)

    @T.macro
    def fma_rows(X, WG, WU, O, M):
        if streams or M * T.int64(weights) >= T.int64(PARALLEL_MIN_MACS):
            for blk in T.parallel(T.int64(blocks)):
                column_block(X, WG, WU, O, M, *split(blk))
        else:
            for blk in range(T.int64(blocks)):
                column_block(X, WG, WU, O, M, *split(blk))

    tiles = not headed and amx.fits(K, NB, dtype) and isa.amx()
    amx_rows = amx.rows_macro(K, NO, gated, act, clamp) if tiles else None

    @T.macro
    def body(X, WG, WU, O, M):
        if tiles:               # nested: TIR's `and` evaluates both sides, and permitted() is a syscall
            if M >= T.int64(amx.MIN_ROWS):
                if amx.permitted():
                    amx_rows(X, WG, WU, O, M)
                else:
                    fma_rows(X, WG, WU, O, M)
            else:
                fma_rows(X, WG, WU, O, M)
        else:
            fma_rows(X, WG, WU, O, M)

    if headed:
        H = heads

        @T.prim_func(private=True)
        def per_head(x_h: T.handle, w_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            B, S = T.int64(), T.int64()
            X = T.match_buffer(x_h, (B, H, S, K), dtype)
            W = T.match_buffer(w_h, (H, NO, K, NB), dtype)
            O = T.match_buffer(o_h, (B, H, S, NO * NB), dtype)
            body(X, W, None, O, B * S)
        return per_head

    if gated:
        @T.prim_func(private=True)
        def gate_up(x_h: T.handle, wg_h: T.handle, wu_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            M = T.int64()
            X = T.match_buffer(x_h, (M, K), dtype)
            WG = T.match_buffer(wg_h, (NO, K, NB), dtype)
            WU = T.match_buffer(wu_h, (NO, K, NB), dtype)
            O = T.match_buffer(o_h, (M, NO * NB), dtype)
            body(X, WG, WU, O, M)
        return gate_up

    @T.prim_func(private=True)
    def dense(x_h: T.handle, w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, K), dtype)
        W = T.match_buffer(w_h, (NO, K, NB), dtype)
        O = T.match_buffer(o_h, (M, NO * NB), dtype)
        body(X, W, None, O, M)
    return dense

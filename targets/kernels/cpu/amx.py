"""f32 GEMM on Intel AMX tiles (Sapphire Rapids and later), at f32's accuracy: gemm.py's packed dense
and gate-up kernels from MIN_ROWS token rows.

AMX multiplies bf16 (8-bit mantissa) pairs into f32 sums. An f32 value splits exactly into three
bf16 parts, x = x0 + x1 + x2 (truncation: x0 keeps the top 8 mantissa bits, x1 the next 8, x2 the
last), so x w = sum of the nine part products; the six kept here (x0 w0, x1 w0, x2 w0, x0 w1, x1 w1,
x0 w2) leave out terms below 2^-24 of x w, f32's own rounding. Against float64 a 128 x 1536 x 4096
product was off by 6.2e-7 of its largest value, NumPy's f32 SGEMM by 5.2e-7. One tile product
(TDPBF16PS, 16 x 16 x 32) takes 4 ns on this host's cores, so six of them give about 680 GFLOP/s a
core against 218 for AVX-512 FMAs; measured with the splits on 2 cores, 128 x 1536 x 4096 ran in 2.8
ms against the FMA tiles' 3.85 with the weights in cache and 3.6 against 4.3 from DRAM, 512 rows in
10.1-10.7 against 15.

Layout: x's rows are split once per call into XS, tiles of 16 rows x 32 k contiguous, the last row
pair padded with zero rows; the column blocks go to CHUNKS tasks, each walking K in blocks of KB: per
(K block, column block) the weights' three parts are written pair-interleaved (the layout TDPBF16PS
reads) to a 48 KB scratch that every row pair (4 accumulator tiles, 32 rows x 32 columns) reads,
while the next block's weights are prefetched into L2. The accumulators live in a padded scratch
between K blocks; the task's last step writes its columns of the output (gated: the activation of
one times the other).

Linux hands AMX's 8 KB of tile state to a process only after arch_prctl(ARCH_REQ_XCOMP_PERM); the
kernel asks on every call (one syscall) and takes the FMA tiles where it is refused. inf or NaN in x
or W come out NaN (x - x0 is inf - inf); the FMA tiles keep inf.
"""
from __future__ import annotations

from tvm.script import tirx as T

from .mlp import activation, clamp_up
from .prefetch import prefetch

ROWS = 32                   # token rows per accumulator pair: 2 x 2 tiles of 16 x 16
MIN_ROWS = 64               # fewer rows take the FMA tiles: the last pair is padded, up to 31 rows wasted
KB = 256                    # k per block: the weights' parts for one column block (3 x 2 x KB / 2 x 64 B = 48 KB)
CHUNKS = 8                  # column-block tasks
PF_ROWS = 8                 # weight rows of the next block prefetched per (row pair, k tile): whole from 128 rows
_INTERLEAVE = [i // 2 + 16 * (i % 2) for i in range(32)]        # k pairs: (k even, k odd) per column
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def fits(k: int, nb: int, dtype: str) -> bool:
    """Whether the AMX tiles take a [K, NO * NB] weight packed [NO, K, NB]."""
    return dtype == "float32" and nb == 32 and k % KB == 0


def permitted():
    """Ask Linux for the tile state (idempotent): true where granted."""
    return T.call_extern("int64", "syscall", T.int64(_SYS_ARCH_PRCTL), T.int64(_ARCH_REQ_XCOMP_PERM),
                         T.int64(_XFEATURE_XTILEDATA)) == T.int64(0)


def _tile(name, *args):
    return T.evaluate(T.call_llvm_intrin("void", "llvm.x86." + name, *args))


def _ptr(buf, indices, extent: int, mask: str):
    """A pointer into `buf` at `indices` that tells TVM the tile instruction touches `extent` elements from
    there (with T.address_of TVM sees one element and shrinks the allocation to what it sees)."""
    return buf.access_ptr(mask, offset=buf.offset_of(indices)[0], extent=extent)


def bf16_part(v, p: int, lanes: int = 1):
    """The p-th bf16 part (its bits, uint16) of f32 `v` (a scalar or a `lanes`-wide vector)."""
    sfx = "" if lanes == 1 else f"x{lanes}"
    u32, f32, u16 = "uint32" + sfx, "float32" + sfx, "uint16" + sfx

    def const(c):
        return T.Broadcast(T.uint32(c), lanes) if lanes > 1 else T.uint32(c)

    for _ in range(p):              # drop the parts before p: x - (x truncated to bf16)
        v = v - T.reinterpret(f32, T.bitwise_and(T.reinterpret(u32, v), const(0xFFFF0000)))
    return T.Cast(u16, T.shift_right(T.reinterpret(u32, v), const(16)))


def rows_macro(k: int, no: int, gated: bool, act: str, clamp: float):
    """T.macro amx_rows(X, WG, WU, O, M): O = X @ W (or gated: act(X Wg) * clamp_up(X Wu)), W packed
    [NO, K, 32]."""
    K, NO, N = k, no, no * 32
    KP, KC = KB // 2, KB // 32          # k pairs, and 32-k tiles, per K block
    per_chunk = -(-NO // CHUNKS)
    TILE_C = 15 * N + 16                # elements an accumulator tile spans in a [rows, N] buffer

    @T.macro
    def configure(cfg):
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)                     # palette 1; 8 tiles of 16 rows x 64 bytes
        for t in range(8):
            cfg[16 + 2 * t] = T.uint8(64)
            cfg[48 + t] = T.uint8(16)
        _tile("ldtilecfg", T.address_of(cfg[0]))

    @T.macro
    def split_pair(WS, W, jo, kb, kp, h, p):
        WS[p, h, kp, T.ramp(0, 1, 32)] = T.Shuffle(
            [bf16_part(W[jo, kb * KB + kp * 2, T.ramp(h * 16, 1, 16)], p, 16),
             bf16_part(W[jo, kb * KB + kp * 2 + 1, T.ramp(h * 16, 1, 16)], p, 16)], _INTERLEAVE)

    @T.macro
    def split_weights(WS, W, jo, kb):
        for kp, h in T.grid(KP, 2):
            split_pair(WS, W, jo, kb, kp, h, 0)
            split_pair(WS, W, jo, kb, kp, h, 1)
            split_pair(WS, W, jo, kb, kp, h, 2)

    @T.macro
    def accumulators(op, mask, C, rp, jo):
        _tile(op, T.int8(0), _ptr(C, [rp * 32, jo * 32], TILE_C, mask), T.int64(N * 4))
        _tile(op, T.int8(1), _ptr(C, [rp * 32, jo * 32 + 16], TILE_C, mask), T.int64(N * 4))
        _tile(op, T.int8(2), _ptr(C, [rp * 32 + 16, jo * 32], TILE_C, mask), T.int64(N * 4))
        _tile(op, T.int8(3), _ptr(C, [rp * 32 + 16, jo * 32 + 16], TILE_C, mask), T.int64(N * 4))

    @T.macro
    def product(XS, WS, rp, kt, kc, xp, wp):
        if xp == 0:         # a new weight part: tiles 6 and 7 (its two 16-column halves)
            _tile("tileloadd64", T.int8(6), _ptr(WS, [wp, 0, kc * 16, 0], 512, "r"), T.int64(64))
            _tile("tileloadd64", T.int8(7), _ptr(WS, [wp, 1, kc * 16, 0], 512, "r"), T.int64(64))
        _tile("tileloadd64", T.int8(4), _ptr(XS, [xp, rp * 2, kt, 0, 0], 512, "r"), T.int64(64))
        _tile("tileloadd64", T.int8(5), _ptr(XS, [xp, rp * 2 + 1, kt, 0, 0], 512, "r"), T.int64(64))
        _tile("tdpbf16ps", T.int8(0), T.int8(4), T.int8(6))
        _tile("tdpbf16ps", T.int8(1), T.int8(4), T.int8(7))
        _tile("tdpbf16ps", T.int8(2), T.int8(5), T.int8(6))
        _tile("tdpbf16ps", T.int8(3), T.int8(5), T.int8(7))

    @T.macro
    def block(XS, WS, W, C, MP, jo, kb):
        """C[:, jo's 32 columns] (+)= XS's K block kb times W's, over MP row pairs."""
        split_weights(WS, W, jo, kb)
        for rp in range(MP):
            if kb == 0:
                _tile("tilezero", T.int8(0))
                _tile("tilezero", T.int8(1))
                _tile("tilezero", T.int8(2))
                _tile("tilezero", T.int8(3))
            else:
                accumulators("tileloadd64", "r", C, rp, jo)
            for kc in range(KC):          # the six part products, weight part major
                if (rp * KC + kc) * PF_ROWS < KB:          # the next column block's weights into L2
                    for i, line in T.grid(PF_ROWS, 2):
                        prefetch(W[jo + 1, kb * KB + (rp * KC + kc) * PF_ROWS + i, line * 16], level=2)
                product(XS, WS, rp, kb * KC + kc, kc, 0, 0)
                product(XS, WS, rp, kb * KC + kc, kc, 1, 0)
                product(XS, WS, rp, kb * KC + kc, kc, 2, 0)
                product(XS, WS, rp, kb * KC + kc, kc, 0, 1)
                product(XS, WS, rp, kb * KC + kc, kc, 1, 1)
                product(XS, WS, rp, kb * KC + kc, kc, 0, 2)
            accumulators("tilestored64", "w", C, rp, jo)

    def column(ch, jj):         # task ch's jj-th column block
        return ch * per_chunk + jj

    def pairs(M):               # row pairs, the last one padded with zero rows (a name bound in TIR
        return (M + T.int64(ROWS - 1)) // T.int64(ROWS)      # cannot size a buffer)

    @T.macro
    def amx_rows(X, WG, WU, O, M):
        XS = T.alloc_buffer((3, pairs(M) * T.int64(2), K // 32, 16, 32), "uint16")
        CS = T.alloc_buffer((pairs(M) * T.int64(ROWS), N), "float32")                       # X Wg (or X W)
        US = T.alloc_buffer((pairs(M) * T.int64(ROWS) if gated else 1, N), "float32")      # X Wu
        for r in T.parallel(M):
            for ko in range(K // 16):
                for l in T.vectorized(16):
                    XS[0, r // 16, ko // 2, r % 16, ko % 2 * 16 + l] = bf16_part(X[r, ko * 16 + l], 0)
                    XS[1, r // 16, ko // 2, r % 16, ko % 2 * 16 + l] = bf16_part(X[r, ko * 16 + l], 1)
                    XS[2, r // 16, ko // 2, r % 16, ko % 2 * 16 + l] = bf16_part(X[r, ko * 16 + l], 2)
        for r, p, ko in T.grid(pairs(M) * T.int64(ROWS) - M, 3, K // 32):    # the padding rows: zero
            for l in T.vectorized(32):
                XS[p, (M + r) // 16, ko, (M + r) % 16, l] = T.uint16(0)
        for ch in T.parallel(CHUNKS):
            WS = T.alloc_buffer((3, 2, KP, 32), "uint16")
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            configure(cfg)
            for kb in range(K // KB):
                for jj in range(per_chunk):
                    if column(ch, jj) < NO:
                        block(XS, WS, WG, CS, pairs(M), column(ch, jj), kb)
                        if gated:
                            block(XS, WS, WU, US, pairs(M), column(ch, jj), kb)
            _tile("tilerelease")
            for jj in range(per_chunk):
                if column(ch, jj) < NO:
                    for r in range(M):
                        for j in T.vectorized(32):
                            if gated:
                                O[r, column(ch, jj) * 32 + j] = activation(act, CS[r, column(ch, jj) * 32 + j], clamp) \
                                    * clamp_up(US[r, column(ch, jj) * 32 + j], clamp)
                            else:
                                O[r, column(ch, jj) * 32 + j] = CS[r, column(ch, jj) * 32 + j]

    return amx_rows

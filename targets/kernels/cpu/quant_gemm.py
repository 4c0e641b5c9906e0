"""QuantMatMul as hand-scheduled TIR: y = x @ dequantize(W)^T (+ bias), weights dequantized in registers.

The loader binds the codes column-blocked like gemm.py's packed weights, bytes unchanged:
bits 4 as Q[N/NB, K/2, NB] uint8 (one byte: codes k = 2 k2 (low nibble) and 2 k2 + 1 of one column),
bits 8 / 16 as Q[N/NB, K, NB]; scales (and zeros) as [N/NB, KB, NB] float32.

Few rows (decode): per k the kernel loads NB codes once, turns them into float32 in registers
(quant_codes.py: a sign extension and shift, no subtraction) and multiplies them into a per-block
accumulator for each row; the block's scale is applied once per block (acc += scale * block_acc,
minus zero * sum(x over the block) where the weights have zero points). The traffic per weight is
its code, never an f32 copy. The column blocks are split over the threads from parallel.py's
PARALLEL_MIN_DECODE_MACS (K N multiply-adds): decoding the codes, not reading them, binds the GEMV.
Where the CPU has byte dot products (int_dot.py: AVX512-VNNI and -VBMI), an int8 / int4 GEMV instead turns each
row's activations into 24-bit block integers once per call and sums codes x digits in int32, 64 per
instruction: 1.4-1.5x the f32 GEMV's speed at K = 1024, N = 4096 (one thread, weights in cache or not).
(On a shared machine a launch waits for a descheduled worker: at load ~18 a K = N = 2048 int4 GEMV
took 1.3 ms on one thread and 28 ms on two; idle, the second core halves it.)

Many rows (prefill): each thread decodes G column blocks at a time into a K x (G NB) f32 scratch
(L2-sized) that all its row tiles then read, so decoding is paid once per block, not once per tile,
and the row tiles run gemm.py's register-blocked product over G NB columns (2 vectors wide).

Vector width comes from the build target (`isa.vector_lanes`): 16 f32 lanes with AVX-512, 8 with AVX2;
it sets the row tiles and G, not the stored layout.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from ..quant_codes import value
from . import int_dot
from .prefetch import PREFETCH_BYTES, prefetch
from .isa import vector_lanes
from .parallel import PARALLEL_MIN_DECODE_MACS, PARALLEL_MIN_MACS

SCRATCH_BYTES = 1 << 20           # the prefill scratch K x (G NB) f32 stays within half of a 2 MB L2
STACK_BYTES = 1024                # TVM's bound for a local buffer on the stack (kMaxStackAlloca)


def column_block(n: int) -> int:
    """NB for the packed quantized layout (0: N does not split into vector-wide blocks)."""
    for nb in (16, 8):
        if n % nb == 0:
            return nb
    return 0


def tiles(k: int, no: int, nb: int, lanes: int, chains: int) -> tuple[int, int, int]:
    """(decode-time rows per tile, G column blocks per prefill scratch, prefill rows per tile). Every register
    tile stays under TVM's 1 KB stack-allocation bound: a bigger local buffer goes to a heap workspace, and
    LLVM then stores the accumulators to memory at every k (measured: 17 ms instead of 7 per call at
    M = K = N 128 x 2048 x 2048)."""
    regs = 32 if lanes == 16 else 16
    per_block = max(1, nb // lanes)                     # vectors per column block
    gemv_rows = max(1, min(8, (regs - 6) // ((1 + chains) * per_block), (STACK_BYTES - 1) // (chains * nb * 4)))
    g = max(1, 2 * lanes // nb)
    while g > 1 and (no % g or k * g * nb * 4 > SCRATCH_BYTES):
        g //= 2
    mb = max(1, min(8, (regs * 3 // 4) // max(1, g * nb // lanes), (STACK_BYTES - 1) // (g * nb * 4)))
    return gemv_rows, g, mb


@cached_kernel
def quant_dense_func(k: int, no: int, nb: int, bits: int, block: int, fmt: str, zeros: bool, bias: bool,
                     dtype: str = "float32", lanes: int = 0):
    """PrimFunc qdense(x [M, K], q, scales [NO, KB, NB] | [1] (16 bits), zeros [NO, KB, NB] | [1],
    bias [NO * NB] | [1], out [M, NO * NB])."""
    K, NO, NB = k, no, nb
    KB = -(-K // block)
    per_byte = 2 if bits == 4 else 1
    R, G, MB = tiles(K, NO, NB, lanes or vector_lanes(), 2 * per_byte)
    W = G * NB
    KQ = K // per_byte
    BQ = block // per_byte
    q_dtype = {"int": "int8" if bits == 8 else "uint8", "f16": "float16", "bf16": "uint16"}.get(fmt, "uint8")
    scaled = bits != 16                  # 16-bit weights are their own values: no scales, no zeros
    centred = not zeros                  # no zero points: decode code - the format's implied zero directly
    zero = tirx.const(0.0, "float32")
    CHAINS = 2 * per_byte            # independent accumulators per row: alternate k, and each nibble
    gemv_parallel = K * NO * NB >= PARALLEL_MIN_DECODE_MACS   # parallel.py: decoding codes binds a GEMV
    byte_dot = scaled and K % block == 0 and int_dot.usable(bits, fmt, zeros, block, NB)
    RD = min(R, 2)                   # byte-dot rows per tile: each row holds CHAINS x DIGITS int32 sums
    RG = int_dot.rows_per_group(bits)    # stored rows of codes per 4 k
    PF_ROWS = PREFETCH_BYTES // NB
    assert K % per_byte == 0 and block % per_byte == 0

    def chains_sum(bacc, ii, ji):
        total = bacc[ii, 0, ji]
        for c in range(1, CHAINS):
            total = total + bacc[ii, c, ji]
        return total

    def w(Q, jo, kk, ji, p):
        return value(Q[jo, kk, ji], bits, fmt, high=int(p) == 1, centred=centred)

    @T.macro
    def gemv_step(X, Q, bacc, xs, row0, ii, jo, kk, c, p):
        for ji in T.vectorized(T.int64(NB)):
            bacc[ii, c * per_byte + p, ji] = bacc[ii, c * per_byte + p, ji] \
                + T.Cast("float32", X[row0 + ii, kk * per_byte + p]) * w(Q, jo, kk, ji, p)
        if zeros:
            xs[ii] = xs[ii] + T.Cast("float32", X[row0 + ii, kk * per_byte + p])

    @T.macro
    def gemv_k(X, Q, bacc, xs, row0, rows, jo, kk, c):
        """Chain c of each row takes the codes of k = kk * per_byte (+ 1)."""
        for ii in T.unroll(rows):
            gemv_step(X, Q, bacc, xs, row0, ii, jo, kk, c, 0)
            if per_byte == 2:
                gemv_step(X, Q, bacc, xs, row0, ii, jo, kk, c, 1)

    @T.macro
    def gemv_tile(X, Q, S, Z, acc, bacc, xs, row0, rows, jo):
        """acc[rows, NB] = x[row0 : row0 + rows] @ W[:, column block jo], decoding per k in registers. Each row
        sums a block into CHAINS independent accumulators (alternate k, and each nibble): one chain would
        wait on the FMA latency at every k."""
        for ii, ji in T.grid(rows, T.int64(NB)):
            acc[ii, ji] = zero
        for kb in range(T.int64(KB)):
            for ii, c, ji in T.grid(rows, T.int64(CHAINS), T.int64(NB)):
                bacc[ii, c, ji] = zero
            if zeros:
                for ii in T.unroll(rows):
                    xs[ii] = zero
            n = T.min(T.int64(BQ), T.int64(KQ) - kb * T.int64(BQ))
            for kq in range(n // T.int64(2)):
                gemv_k(X, Q, bacc, xs, row0, rows, jo, kb * T.int64(BQ) + kq * T.int64(2), 0)
                gemv_k(X, Q, bacc, xs, row0, rows, jo, kb * T.int64(BQ) + kq * T.int64(2) + T.int64(1), 1)
            if n % T.int64(2) == T.int64(1):
                gemv_k(X, Q, bacc, xs, row0, rows, jo, kb * T.int64(BQ) + n - T.int64(1), 0)
            for ii in T.unroll(rows):
                for ji in T.vectorized(T.int64(NB)):
                    if not scaled:
                        acc[ii, ji] = acc[ii, ji] + chains_sum(bacc, ii, ji)
                    elif zeros:
                        acc[ii, ji] = acc[ii, ji] + (chains_sum(bacc, ii, ji) - Z[jo, kb, ji] * xs[ii]) * S[jo, kb, ji]
                    else:
                        acc[ii, ji] = acc[ii, ji] + chains_sum(bacc, ii, ji) * S[jo, kb, ji]

    @T.macro
    def store(O, B, acc, row0, rows, col0, width):
        for ii in T.unroll(rows):
            for ji in T.vectorized(T.int64(width)):
                if bias:
                    O[row0 + ii, col0 + ji] = T.Cast(dtype, acc[ii, ji] + T.Cast("float32", B[col0 + ji]))
                else:
                    O[row0 + ii, col0 + ji] = T.Cast(dtype, acc[ii, ji])

    @T.macro
    def gemv_columns(X, Q, S, Z, B, O, M, jo):
        acc = T.alloc_buffer((R, NB), "float32", scope="local")
        bacc = T.alloc_buffer((R, CHAINS, NB), "float32", scope="local")
        xs = T.alloc_buffer((R,), "float32", scope="local")
        for io in range(M // T.int64(R)):
            gemv_tile(X, Q, S, Z, acc, bacc, xs, io * T.int64(R), T.int64(R), jo)
            store(O, B, acc, io * T.int64(R), T.int64(R), jo * T.int64(NB), NB)
        for i in range(M // T.int64(R) * T.int64(R), M):
            gemv_tile(X, Q, S, Z, acc, bacc, xs, i, T.int64(1), jo)
            store(O, B, acc, i, T.int64(1), jo * T.int64(NB), NB)

    @T.macro
    def bytes_tile(Q, S, dig, sx, vs, acc, dsum, row0, rows, jo):
        """gemv_tile over byte dot products (int_dot.py): per block, CHAINS x DIGITS int32 sums per row."""
        for ii, ji in T.grid(rows, T.int64(NB)):
            acc[ii, ji] = zero
        for kb in range(T.int64(KB)):
            for ii, ch, d, ji in T.grid(rows, int_dot.CHAINS, int_dot.DIGITS, T.int64(NB)):
                dsum[ii, ch, d, ji] = 0
            for g in range(T.int64(BQ // (RG * int_dot.CHAINS))):
                prefetch(Q[jo, kb * T.int64(BQ) + g * T.int64(RG * int_dot.CHAINS) + T.int64(PF_ROWS), 0])
                for ch in T.unroll(int_dot.CHAINS):
                    kq = kb * T.int64(BQ) + (g * T.int64(int_dot.CHAINS) + T.int64(ch)) * T.int64(RG)
                    codes = int_dot.code_bytes([Q[jo, kq + T.int64(r), T.Ramp(T.int64(0), 1, NB)] for r in range(RG)],
                                               bits, fmt == "int")
                    for ii in T.unroll(rows):
                        for d in T.unroll(int_dot.DIGITS):
                            dsum[ii, ch, d, T.Ramp(0, 1, NB)] = int_dot.dot(
                                dsum[ii, ch, d, T.Ramp(0, 1, NB)], codes,
                                int_dot.digits4(dig, row0 + ii, d, kq * T.int64(per_byte)))
            for ii in T.unroll(rows):
                for ji in T.vectorized(T.int64(NB)):
                    acc[ii, ji] = acc[ii, ji] + int_dot.block_value(
                        dsum[ii, 0, 0, ji] + dsum[ii, 1, 0, ji], dsum[ii, 0, 1, ji] + dsum[ii, 1, 1, ji],
                        dsum[ii, 0, 2, ji] + dsum[ii, 1, 2, ji], vs[row0 + ii, kb], sx[row0 + ii, kb], bits) \
                        * S[jo, kb, ji]

    @T.macro
    def bytes_columns(Q, S, B, O, dig, sx, vs, M, jo):
        acc = T.alloc_buffer((RD, NB), "float32", scope="local")
        dsum = T.alloc_buffer((RD, int_dot.CHAINS, int_dot.DIGITS, NB), "int32", scope="local")
        for io in range(M // T.int64(RD)):
            bytes_tile(Q, S, dig, sx, vs, acc, dsum, io * T.int64(RD), T.int64(RD), jo)
            store(O, B, acc, io * T.int64(RD), T.int64(RD), jo * T.int64(NB), NB)
        for i in range(M // T.int64(RD) * T.int64(RD), M):
            bytes_tile(Q, S, dig, sx, vs, acc, dsum, i, T.int64(1), jo)
            store(O, B, acc, i, T.int64(1), jo * T.int64(NB), NB)

    @T.macro
    def decode_step(Q, S, Z, wblk, g, jb, kb, kk, p):
        for ji in T.vectorized(T.int64(NB)):
            if not scaled:
                wblk[kk * per_byte + p, g * T.int64(NB) + ji] = w(Q, jb, kk, ji, p)
            elif zeros:
                wblk[kk * per_byte + p, g * T.int64(NB) + ji] = (w(Q, jb, kk, ji, p) - Z[jb, kb, ji]) * S[jb, kb, ji]
            else:
                wblk[kk * per_byte + p, g * T.int64(NB) + ji] = w(Q, jb, kk, ji, p) * S[jb, kb, ji]

    @T.macro
    def decode_group(Q, S, Z, wblk, jg):
        """wblk[k, g NB + ji] = W[k, column (jg G + g) NB + ji] in f32, for the G blocks of group jg."""
        for g in range(T.int64(G)):
            for kb in range(T.int64(KB)):
                for kq in range(T.min(T.int64(BQ), T.int64(KQ) - kb * T.int64(BQ))):
                    decode_step(Q, S, Z, wblk, g, jg * T.int64(G) + g, kb, kb * T.int64(BQ) + kq, 0)
                    if per_byte == 2:
                        decode_step(Q, S, Z, wblk, g, jg * T.int64(G) + g, kb, kb * T.int64(BQ) + kq, 1)

    @T.macro
    def decoded_tile(X, wblk, acc, row0, rows):
        for ii, ji in T.grid(rows, T.int64(W)):
            acc[ii, ji] = zero
        for kk in range(T.int64(K)):
            for ii in T.unroll(rows):
                for ji in T.vectorized(T.int64(W)):
                    acc[ii, ji] = acc[ii, ji] + T.Cast("float32", X[row0 + ii, kk]) * wblk[kk, ji]

    @T.macro
    def decoded_columns(X, Q, S, Z, B, O, M, jg):
        acc = T.alloc_buffer((MB, W), "float32", scope="local")
        wblk = T.alloc_buffer((K, W), "float32")
        decode_group(Q, S, Z, wblk, jg)
        for io in range(M // T.int64(MB)):
            decoded_tile(X, wblk, acc, io * T.int64(MB), T.int64(MB))
            store(O, B, acc, io * T.int64(MB), T.int64(MB), jg * T.int64(W), W)
        for i in range(M // T.int64(MB) * T.int64(MB), M):
            decoded_tile(X, wblk, acc, i, T.int64(1))
            store(O, B, acc, i, T.int64(1), jg * T.int64(W), W)

    @T.prim_func(private=True)
    def qdense(x_h: T.handle, q_h: T.handle, s_h: T.handle, z_h: T.handle, b_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, K), dtype)
        Q = T.match_buffer(q_h, (NO, KQ, NB), q_dtype)
        S = T.match_buffer(s_h, (NO, KB, NB) if scaled else (1,), "float32")
        Z = T.match_buffer(z_h, (NO, KB, NB) if zeros else (1,), "float32")
        B = T.match_buffer(b_h, (NO * NB,) if bias else (1,), "float32")
        O = T.match_buffer(o_h, (M, NO * NB), dtype)
        if M < T.int64(MB):
            if byte_dot:
                dig = T.alloc_buffer((M, int_dot.DIGITS, K), "int8")
                sx = T.alloc_buffer((M, KB), "float32")
                vs = T.alloc_buffer((M, KB), "float32")
                for i in range(M):
                    int_dot.quantize_row(X, i, K, block, dig, i, sx, vs)
                if gemv_parallel:
                    for jo in T.parallel(T.int64(NO)):
                        bytes_columns(Q, S, B, O, dig, sx, vs, M, jo)
                else:
                    for jo in range(T.int64(NO)):
                        bytes_columns(Q, S, B, O, dig, sx, vs, M, jo)
            elif gemv_parallel:
                for jo in T.parallel(T.int64(NO)):
                    gemv_columns(X, Q, S, Z, B, O, M, jo)
            else:
                for jo in range(T.int64(NO)):
                    gemv_columns(X, Q, S, Z, B, O, M, jo)
        elif M * T.int64(K * NO * NB) >= T.int64(PARALLEL_MIN_MACS):
            for jg in T.parallel(T.int64(NO // G)):
                decoded_columns(X, Q, S, Z, B, O, M, jg)
        else:
            for jg in range(T.int64(NO // G)):
                decoded_columns(X, Q, S, Z, B, O, M, jg)
    return qdense

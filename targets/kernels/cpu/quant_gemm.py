"""QuantMatMul as hand-scheduled TIR: y = x @ dequantize(W)^T (+ bias), weights dequantized in registers.

The loader binds the codes column-blocked like gemm.py's packed weights, bytes unchanged:
bits 4 as Q[N/NB, K/2, NB] uint8 (one byte: codes k = 2 k2 (low nibble) and 2 k2 + 1 of one column),
bits 8 as Q[N/NB, K, NB]; scales (and zeros) as [N/NB, KB, NB] float32. Per k the kernel loads NB
codes once, decodes them into NB float32 weights in registers (mask/shift, convert, subtract the
zero, scale) and reuses them for a tile of MB token rows, as gemm.py does with f32 weights; the
memory traffic per weight is its code (4 or 8 bits), never an f32 copy of the weight. With more rows
than one tile (prefill), each thread decodes one column block at a time into a K x NB f32 scratch
(L2-sized) that all its row tiles then read, so decoding is paid once per block, not once per tile.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .gemm import tile_rows
from .parallel import PARALLEL_MIN_MACS

F8_BIAS = 0x3C000000        # (127 - 7) << 23: an e4m3 exponent moved into float32's bias


def column_block(n: int) -> int:
    """NB for the packed quantized layout (0: N does not split into vector-wide blocks)."""
    for nb in (16, 8):
        if n % nb == 0:
            return nb
    return 0


def default_zero(bits: int, fmt: str) -> float:
    """The zero a format implies without a zeros input (matches ir/fused/quant.py)."""
    return float(2 ** (bits - 1)) if fmt == "uint" else 0.0


def _fp8_e4m3(b):
    """float32 value of the e4m3fn byte b (uint8): exponent rebias by integer add, subnormals by select."""
    mag = tirx.bitwise_and(b, tirx.const(0x7F, "uint8"))
    m32 = tirx.Cast("uint32", mag)
    normal = tirx.reinterpret("float32", tirx.shift_left(m32, tirx.const(20, "uint32")) + tirx.const(F8_BIAS, "uint32"))
    sub = tirx.Cast("float32", mag) * tirx.const(2.0 ** -9, "float32")
    v = tirx.Select(tirx.shift_right(mag, tirx.const(3, "uint8")) == tirx.const(0, "uint8"), sub, normal)
    return tirx.Select(tirx.bitwise_and(b, tirx.const(0x80, "uint8")) != tirx.const(0, "uint8"), -v, v)


def _code(b, bits: int, fmt: str, high: bool = False):
    """The decoded code (float32) of byte b; for 4 bits its low or high nibble. Signed int4 is
    decoded as (nibble ^ 8) - 8, the `- 8` folded into the zero by the caller. 16-bit weights:
    f16 converts (F16C), bf16 is the top half of a float32."""
    if fmt == "bf16":
        return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("uint32", b), tirx.const(16, "uint32")))
    if bits == 4:
        nib = tirx.shift_right(b, tirx.const(4, "uint8")) if high else tirx.bitwise_and(b, tirx.const(15, "uint8"))
        if fmt == "int":
            nib = tirx.bitwise_xor(nib, tirx.const(8, "uint8"))
        return tirx.Cast("float32", nib)
    if fmt == "fp8e4m3":
        return _fp8_e4m3(b)
    return tirx.Cast("float32", b)


def quant_dense_func(k: int, no: int, nb: int, bits: int, block: int, fmt: str, zeros: bool, bias: bool,
                     dtype: str = "float32"):
    """PrimFunc qdense(x [M, K], q, scales [NO, KB, NB] | [1] (16 bits), zeros [NO, KB, NB] | [1],
    bias [NO * NB] | [1], out [M, NO * NB])."""
    K, NO, NB = k, no, nb
    KB = -(-K // block)
    MB = tile_rows(nb)
    per_byte = 2 if bits == 4 else 1
    KQ = K // per_byte
    q_dtype = {"int": "int8" if bits == 8 else "uint8", "f16": "float16", "bf16": "uint16"}.get(fmt, "uint8")
    scaled = bits != 16                  # 16-bit weights are their own values: no scales, no zeros
    offset = tirx.const(8.0 if (bits == 4 and fmt == "int") else 0.0, "float32")   # signed int4: (n ^ 8) - 8
    zero = tirx.const(0.0, "float32")
    implied_zero = tirx.const(default_zero(bits, fmt), "float32")
    assert K % per_byte == 0 and block % per_byte == 0

    @T.macro
    def block_params(S, Z, sv, zv, jo, kb):
        for ji in T.vectorized(T.int64(NB)):
            sv[ji] = S[jo, kb, ji] if scaled else T.float32(1)
            if zeros:
                zv[ji] = Z[jo, kb, ji] + offset
            else:
                zv[ji] = implied_zero + offset

    @T.macro
    def decode(Q, sv, zv, dst, row, jo, kk):
        """dst[row + p, :] = the weights of k = kk * per_byte + p, p < per_byte, of column block jo."""
        if scaled:
            for ji in T.vectorized(T.int64(NB)):
                dst[row, ji] = (_code(Q[jo, kk, ji], bits, fmt) - zv[ji]) * sv[ji]
        else:
            for ji in T.vectorized(T.int64(NB)):
                dst[row, ji] = _code(Q[jo, kk, ji], bits, fmt)
        if per_byte == 2:
            for ji in T.vectorized(T.int64(NB)):
                dst[row + 1, ji] = (_code(Q[jo, kk, ji], bits, fmt, high=True) - zv[ji]) * sv[ji]

    @T.macro
    def accumulate(X, Q, S, Z, acc, w, sv, zv, row0, rows, jo):
        """One row tile, decoding each k's weights into registers as it goes (few rows: decode once per tile)."""
        for ii, ji in T.grid(rows, T.int64(NB)):
            acc[ii, ji] = zero
        for kb in range(T.int64(KB)):
            block_params(S, Z, sv, zv, jo, kb)
            for kq in range(T.min(T.int64(block // per_byte), T.int64(KQ) - kb * T.int64(block // per_byte))):
                kk = kb * T.int64(block // per_byte) + kq
                decode(Q, sv, zv, w, T.int64(0), jo, kk)
                for ii in T.unroll(rows):
                    for p in T.unroll(per_byte):
                        for ji in T.vectorized(T.int64(NB)):
                            acc[ii, ji] = acc[ii, ji] + T.Cast("float32", X[row0 + ii, kk * per_byte + p]) * w[p, ji]

    @T.macro
    def accumulate_decoded(X, wblk, acc, row0, rows):
        """One row tile over a column block decoded once into wblk [K, NB] (many rows: decode once per block)."""
        for ii, ji in T.grid(rows, T.int64(NB)):
            acc[ii, ji] = zero
        for kk in range(T.int64(K)):
            for ii in T.unroll(rows):
                for ji in T.vectorized(T.int64(NB)):
                    acc[ii, ji] = acc[ii, ji] + T.Cast("float32", X[row0 + ii, kk]) * wblk[kk, ji]

    @T.macro
    def store(O, B, acc, row0, rows, jo):
        for ii in T.unroll(rows):
            for ji in T.vectorized(T.int64(NB)):
                if bias:
                    O[row0 + ii, jo * T.int64(NB) + ji] = T.Cast(
                        dtype, acc[ii, ji] + T.Cast("float32", B[jo * T.int64(NB) + ji]))
                else:
                    O[row0 + ii, jo * T.int64(NB) + ji] = T.Cast(dtype, acc[ii, ji])

    @T.macro
    def columns(X, Q, S, Z, B, O, M, jo):
        acc = T.alloc_buffer((MB, NB), "float32", scope="local")
        w = T.alloc_buffer((per_byte, NB), "float32", scope="local")
        sv = T.alloc_buffer((NB,), "float32", scope="local")
        zv = T.alloc_buffer((NB,), "float32", scope="local")
        if M > T.int64(MB):
            # a column block's weights are decoded once into L2 (K x NB floats, per thread), then every row
            # tile reads them: decoding per tile would repeat it M / MB times
            wblk = T.alloc_buffer((K, NB), "float32")
            for kb in range(T.int64(KB)):
                block_params(S, Z, sv, zv, jo, kb)
                for kq in range(T.min(T.int64(block // per_byte), T.int64(KQ) - kb * T.int64(block // per_byte))):
                    decode(Q, sv, zv, wblk, (kb * T.int64(block // per_byte) + kq) * per_byte, jo,
                           kb * T.int64(block // per_byte) + kq)
            for io in range(M // T.int64(MB)):
                accumulate_decoded(X, wblk, acc, io * T.int64(MB), T.int64(MB))
                store(O, B, acc, io * T.int64(MB), T.int64(MB), jo)
            for i in range(M // T.int64(MB) * T.int64(MB), M):
                accumulate_decoded(X, wblk, acc, i, T.int64(1))
                store(O, B, acc, i, T.int64(1), jo)
        else:
            for io in range(M // T.int64(MB)):
                accumulate(X, Q, S, Z, acc, w, sv, zv, io * T.int64(MB), T.int64(MB), jo)
                store(O, B, acc, io * T.int64(MB), T.int64(MB), jo)
            for i in range(M // T.int64(MB) * T.int64(MB), M):
                accumulate(X, Q, S, Z, acc, w, sv, zv, i, T.int64(1), jo)
                store(O, B, acc, i, T.int64(1), jo)

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
        if M * T.int64(K * NO * NB) >= T.int64(PARALLEL_MIN_MACS):
            for jo in T.parallel(T.int64(NO)):
                columns(X, Q, S, Z, B, O, M, jo)
        else:
            for jo in range(T.int64(NO)):
                columns(X, Q, S, Z, B, O, M, jo)
    return qdense

"""Quantized GEMVs as byte dot products (AVX512-VNNI `vpdpbusd`), at f32's precision.

Where a decode step's weights sit in the last-level cache (an MoE model's active experts here), it is
bound by decoding codes, not by reading them: on f32 FMAs every code costs a shift, a conversion and
an FMA per lane (quant_codes.py). `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of
four products into one int32 lane: 64 multiply-adds in one instruction, exactly.

Activations: each block of `block` k of a row becomes integers v = round(x / sx) with
|v| <= 2^23 - 2^16 (sx = max|x| over the block / that bound), written as three signed base-256
digits, v = 65536 h + 256 m + l with h, m, l in [-128, 127]. The rounding error is at most sx / 2,
2^-24 of the block's largest |x|: the size of f32's own rounding, so the result matches the f32
kernels to f32 accuracy, not to int8 activation quantization's.

Weights: a code read unsigned, u in 0..2^bits - 1, stands for u - OFFSET[bits] (a two's-complement
code is flipped to that form by xor with the top bit, as quant_codes.py's `centred`). Per 4 k and 16
columns each digit takes one `vpdpbusd` (int32 sums: at most block * 255 * 128, exact), and a block's
f32 value is sx * (65536 H + 256 M + L - OFFSET sum(v)), times the weight's block scale.

The codes come as quant_gemm.py and moe.py bind them, 16 columns a row. 4 bits: one byte per
column holds k = 2 kq (low nibble) and 2 kq + 1; two rows (kq, kq + 1) become one 64-byte vector
whose 32-bit lane c holds column c's four codes as bytes in k order: `vpermb` pairs the rows' bytes
per column, `vpmultishiftqb` moves every nibble to its own byte, and one mask keeps 4 bits. 8 bits:
four rows (k .. k + 3), one `vpermb` gathers each column's four bytes.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from .isa import byte_dot

DIGITS = 3
V_MAX = (1 << 23) - (1 << 16)     # |v| bound: the top digit stays within [-128, 127]
LANES = 16                        # int32 lanes: the columns one vpdpbusd serves
CHAINS = 2                        # independent sums per digit (vpdpbusd's latency is ~5 cycles)
# vpermb: bytes 0..15 are row kq's 16 columns, 16..31 row kq + 1's; qword q gets columns 2q and 2q + 1
_PAIR = [i for q in range(8) for i in (2 * q, 16 + 2 * q, 2 * q + 1, 17 + 2 * q, 0, 0, 0, 0)]
_NIBBLE_SHIFTS = 0x1C1814100C080400   # vpmultishiftqb: byte j of a qword <- its bits 4 j .. 4 j + 7


OFFSET = {4: 8, 8: 128}           # the unsigned code that stands for 0
_BYTES = [16 * j + c for c in range(16) for j in range(4)]   # 8 bits: lane c <- byte c of rows 0..3


def usable(bits: int, fmt: str, zeros: bool, block: int, nb: int = LANES) -> bool:
    """Whether a GEMV over these codes runs as byte dot products: 4- or 8-bit integer codes without zero
    points (int, or uint centred on OFFSET), blocks of whole 4-k groups for both chains, 16-column blocks,
    a CPU with the instructions (isa.byte_dot)."""
    return bits in OFFSET and fmt in ("int", "uint") and not zeros and block % (4 * CHAINS) == 0 \
        and nb == LANES and byte_dot()


def rows_per_group(bits: int) -> int:
    """Stored rows of 16 code bytes holding 4 k."""
    return 2 if bits == 4 else 4


def code_bytes(rows, bits: int, flip: bool):
    """int8x64 of 16 columns x 4 k from `rows_per_group(bits)` rows of 16 stored code bytes (uint8x16 or
    int8x16): lane c's bytes are column c's unsigned codes at the group's 4 k, in k order; `flip` reads
    two's-complement codes."""
    top = 8 if bits == 4 else 128
    rows = [T.reinterpret("uint8x16", r) for r in rows]
    if bits == 4:
        paired = T.Shuffle(rows * 2, _PAIR)        # (a Shuffle yields at most its inputs' lanes)
        shifts = T.reinterpret("uint8x64", T.Broadcast(T.uint64(_NIBBLE_SHIFTS), 8))
        spread = T.call_llvm_pure_intrin("uint8x64", "llvm.x86.avx512.pmultishift.qb.512", shifts, paired)
        u = T.bitwise_and(spread, T.Broadcast(T.uint8(15), 64))
    else:
        u = T.Shuffle(rows, _BYTES)
    if flip:
        u = T.bitwise_xor(u, T.Broadcast(T.uint8(top), 64))
    return T.reinterpret("int8x64", u)


def dot(acc, codes, x4):
    """acc (int32x16) + for each column lane: the sum over its 4 k of code * digit; x4 (int32): the four
    digits (`digits4`)."""
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, codes,
                                   T.reinterpret("int8x64", T.Broadcast(x4, LANES)))


def digits4(dig, row, d, k0):
    """Digit d of row `row` at k0 .. k0 + 3, as one int32."""
    return T.reinterpret("int32", dig[row, d, T.Ramp(k0, 1, 4)])


def block_value(h, m, l, vsum, sx, bits: int):
    """f32 value of a block's digit sums H, M, L (one lane each) with sum(v) and the row's block scale."""
    f32 = "float32"
    return (T.Cast(f32, h) * T.float32(65536) + T.Cast(f32, m) * T.float32(256) + T.Cast(f32, l)
            - T.float32(OFFSET[bits]) * vsum) * sx


def _low(v):
    """v's balanced low base-256 digit, in [-128, 127]."""
    return T.bitwise_and(v + 128, 255) - 128


def _rest(v):
    return T.shift_right(v - _low(v), 8)


def _high(v):
    return T.shift_right(_rest(v) - _low(_rest(v)), 8)


@T.macro
def quantize_row(src, row, k: int, block: int, dig, dig_row, sx, vs):
    """dig[dig_row, d, :k] = the digits (d: 0 high .. 2 low) of src[row, :k] in blocks of `block`;
    sx[dig_row, b] = the block's scale, vs[dig_row, b] = sum(v) over it."""
    for b in range(k // block):
        top = T.alloc_local((math.gcd(block, LANES),), "float32")
        for j in T.vectorized(math.gcd(block, LANES)):
            top[j] = T.fabs(T.Cast("float32", src[row, b * block + j]))
        for i in range(1, block // math.gcd(block, LANES)):
            for j in T.vectorized(math.gcd(block, LANES)):
                top[j] = T.max(top[j], T.fabs(T.Cast("float32", src[row, b * block + i * math.gcd(block, LANES) + j])))
        amax = T.alloc_local((1,), "float32")
        amax[0] = top[0]
        for j in range(1, math.gcd(block, LANES)):
            amax[0] = T.max(amax[0], top[j])
        inv = T.Select(amax[0] > T.float32(0), T.float32(V_MAX) / amax[0], T.float32(0))
        sx[dig_row, b] = amax[0] / T.float32(V_MAX)
        v = T.alloc_local((block,), "int32")
        for i in T.vectorized(block):
            v[i] = T.Cast("int32", T.nearbyint(T.Cast("float32", src[row, b * block + i]) * inv))
        for i in T.vectorized(block):       # expressions, not names: a name here would bind a scalar
            dig[dig_row, 0, b * block + i] = T.Cast("int8", _high(v[i]))
            dig[dig_row, 1, b * block + i] = T.Cast("int8", _low(_rest(v[i])))
            dig[dig_row, 2, b * block + i] = T.Cast("int8", _low(v[i]))
        total = T.alloc_local((1,), "int32")
        total[0] = 0
        for i in range(block):
            total[0] = total[0] + v[i]
        vs[dig_row, b] = T.Cast("float32", total[0])

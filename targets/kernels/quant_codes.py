"""Stored weight codes -> float32, as TIR expressions (ir/fused/quant.py's formats), for every kernel that
reads QuantMatMul-layout weights: the cpu kernels decode them in registers, the portable TE computes where
the reduction reads them.

`code` is a code's exact value (what ir/fused/quant.py's `codes` gives); `centred` is code - the format's
implied zero (uint: 2^(bits-1)), computed without a subtraction: flipping the top bit of each nibble / byte
and reading it as two's complement gives the same integer."""
from __future__ import annotations

from tvm import tirx

F8_BIAS = 0x3C000000        # (127 - 7) << 23: an e4m3 exponent moved into float32's bias


def _u32(v: int):
    return tirx.const(v, "uint32")


def _i32(v: int):
    return tirx.const(v, "int32")


def _fp8_e4m3(b):
    """float32 value of the e4m3fn byte b (uint8): exponent rebias by integer add, subnormals by select."""
    mag = tirx.bitwise_and(b, tirx.const(0x7F, "uint8"))
    m32 = tirx.Cast("uint32", mag)
    normal = tirx.reinterpret("float32", tirx.shift_left(m32, _u32(20)) + _u32(F8_BIAS))
    sub = tirx.Cast("float32", mag) * tirx.const(2.0 ** -9, "float32")
    v = tirx.Select(tirx.shift_right(mag, tirx.const(3, "uint8")) == tirx.const(0, "uint8"), sub, normal)
    return tirx.Select(tirx.bitwise_and(b, tirx.const(0x80, "uint8")) != tirx.const(0, "uint8"), -v, v)


def _signed(b, bits: int, high: bool):
    """b's two's-complement nibble (bits 4) or byte as float32: the byte sign-extended to int32, then an
    arithmetic shift (x86 has no byte shifts; these are single 32-bit vector instructions)."""
    s = tirx.Cast("int32", tirx.Cast("int8", b))
    if bits == 4:
        s = tirx.shift_right(s, _i32(4)) if high else tirx.shift_right(tirx.shift_left(s, _i32(28)), _i32(28))
    return tirx.Cast("float32", s)


def _unsigned(b, bits: int, high: bool):
    if bits == 4:
        b = tirx.shift_right(b, tirx.const(4, "uint8")) if high else tirx.bitwise_and(b, tirx.const(15, "uint8"))
    return tirx.Cast("float32", b)


def value(b, bits: int, fmt: str, high: bool = False, centred: bool = False):
    """The float32 of stored element b (for 4 bits its low or high nibble): the code, or with `centred`
    the code minus the format's implied zero. 16-bit weights: f16 converts (F16C), bf16 is the top half
    of a float32."""
    if fmt == "bf16":
        return tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("uint32", b), _u32(16)))
    if fmt == "f16":
        return tirx.Cast("float32", b)
    if fmt == "fp8e4m3":
        return _fp8_e4m3(b)
    if fmt == "int":
        return _signed(b, bits, high)
    if centred:                              # uint - 2^(bits-1) == the top bit flipped, read signed
        return _signed(tirx.bitwise_xor(b, tirx.const(0x88 if bits == 4 else 0x80, "uint8")), bits, high)
    return _unsigned(b, bits, high)

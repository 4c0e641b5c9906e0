"""ONNX Runtime's `com.microsoft::MatMulNBits` -> polyport::QuantMatMul, at import.

As `onnxruntime.quantization.matmul_nbits_quantizer` writes it: B uint8
[N, KB, block_size * bits / 8], scales [N * KB] or [N, KB], optional packed
uint8 zero points (absent: zero 2^(bits-1)), optional bias. The codes move into
QuantMatMul's layout (ir/quant_layout.py) unchanged; nothing is dequantized.
"""
from __future__ import annotations

import numpy as np

from ..ir.quant_layout import from_matmul_nbits
from .fused_import import MS, Conversion, converts


@converts(MS, "MatMulNBits")
def ms_matmul_nbits(c: Conversion):
    K, N = int(c.attr("K", 0)), int(c.attr("N", 0))
    bits, block = int(c.attr("bits", 4)), int(c.attr("block_size", 0))
    if bits not in (4, 8):
        raise c.unsupported(f"bits={bits}", "polyport takes 4- and 8-bit weights")
    if block < 16 or block & (block - 1):
        raise c.unsupported(f"block_size={block}", "MatMulNBits blocks are a power of two >= 16")
    b, scales, zp = c.inp(1), c.inp(2), c.inp(3)
    for what, v in (("B", b), ("scales", scales), ("zero_points", zp)):
        if v is not None and not v.is_constant:
            raise c.unsupported(f"{what} that is not a constant", "weights must be initializers")
    if c.inp(4) is not None and c.inp(4).const is not None and c.inp(4).const.size:
        raise c.unsupported("g_idx (act-order)")
    if zp is not None and zp.const.dtype != np.uint8:
        raise c.unsupported(f"zero_points of dtype {zp.dtype}", "polyport takes packed uint8 zero points")
    kb = -(-K // block)
    if b.const.size != N * kb * block * bits // 8 or scales.const.size != N * kb:
        raise c.unsupported(f"B of shape {list(b.const.shape)} / scales of {list(scales.const.shape)}",
                            f"K={K}, N={N}, block_size={block} need {N * kb * block * bits // 8} bytes and "
                            f"{N * kb} scales")
    qw = from_matmul_nbits(b.const, scales.const, None if zp is None else zp.const,
                           K=K, N=N, bits=bits, block_size=block)
    ins = [c.inp(0), c.const(qw.qweight, "qweight"), c.const(qw.scales, "scales"),
           None if qw.zeros is None else c.const(qw.zeros, "zeros"), c.inp(5)]
    return [c.fused("QuantMatMul", ins, qw.attrs, out=c.outputs[0])]

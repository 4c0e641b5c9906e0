"""ONNX Runtime's `com.microsoft::MatMulNBits` -> polyport::QuantMatMul and
`com.microsoft::GatherBlockQuantized` -> polyport::QuantGather, at import.

MatMulNBits, as `onnxruntime.quantization.matmul_nbits_quantizer` writes it: B uint8
[N, KB, block_size * bits / 8], scales [N * KB] or [N, KB], optional packed
uint8 zero points (absent: zero 2^(bits-1)), optional bias. The codes move into
QuantMatMul's layout (ir/quant_layout.py) unchanged; nothing is dequantized.

GatherBlockQuantized, as the same quantizer writes a token-embedding table with
`op_types_to_quantize=("MatMul", "Gather")`: data [N, K] (int4 / uint4 / int8 / uint8,
or uint8 holding two 4-bit codes with bits=4), blocks along K (quantize_axis 1), rows
gathered (gather_axis 0), scales [N, KB], optional zero points. QuantGather is symmetric:
zero points other than the format's implied one (0; 2^(bits-1) for unsigned codes) make
the table an f32 Gather, dequantized once at import (4x its bytes; correct, not compact).
"""
from __future__ import annotations

import numpy as np

import ml_dtypes

from ..ir.quant_layout import from_matmul_nbits, pack_int4, unpack_nibbles
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


_GBQ_CODES = {np.dtype(ml_dtypes.int4): (4, True), np.dtype(ml_dtypes.uint4): (4, False),
              np.dtype(np.int8): (8, True), np.dtype(np.uint8): (8, False)}


@converts(MS, "GatherBlockQuantized")
def ms_gather_block_quantized(c: Conversion):
    data, indices, scales, zp = c.inp(0), c.inp(1), c.inp(2), c.inp(3)
    for what, v in (("data", data), ("scales", scales), ("zero_points", zp)):
        if v is not None and not v.is_constant:
            raise c.unsupported(f"{what} that is not a constant", "the table must be an initializer")
    q = np.asarray(data.const)
    if q.ndim != 2 or np.dtype(q.dtype) not in _GBQ_CODES:
        raise c.unsupported(f"data of dtype {q.dtype} / rank {q.ndim}", "takes a 2-D int4, uint4, int8 or uint8 table")
    gather_axis, quantize_axis = int(c.attr("gather_axis", 0)), int(c.attr("quantize_axis", 1))
    if gather_axis != 0 or quantize_axis not in (1, -1):
        raise c.unsupported(f"gather_axis={gather_axis}, quantize_axis={quantize_axis}", "takes 0 and 1 (rows of an embedding table)")
    bits, signed = _GBQ_CODES[np.dtype(q.dtype)]
    bits_attr = int(c.attr("bits", 4))
    if bits_attr not in (4, 8):
        raise c.unsupported(f"bits={bits_attr}", "polyport takes 4- and 8-bit tables")
    if q.dtype == np.uint8 and bits_attr == 4:      # two 4-bit codes per byte (bits defaults to 4)
        bits, q = 4, unpack_nibbles(q, q.shape[1] * 2)
    block = int(c.attr("block_size", 128))
    n, k = q.shape
    s = np.asarray(scales.const, np.float32)
    if s.shape != (n, -(-k // block)):
        raise c.unsupported(f"scales of shape {list(s.shape)}", f"a [{n}, {k}] table in blocks of {block} needs "
                            f"[{n}, {-(-k // block)}]")
    implied = 0 if signed else 2 ** (bits - 1)
    values = np.asarray(q).astype(np.int16)
    z = np.full(s.shape, implied, np.int16) if zp is None else np.asarray(zp.const).astype(np.int16)
    if zp is not None and bits == 4 and z.shape != s.shape:      # zero points packed two per byte along K
        z = unpack_nibbles(np.asarray(zp.const).astype(np.uint8), s.shape[1]).astype(np.int16)
    if z.shape != s.shape:
        raise c.unsupported(f"zero_points of shape {list(np.shape(zp.const))}", f"takes [{n}, {s.shape[1]}]")
    if np.any(z != implied):                    # asymmetric: QuantGather cannot hold it
        w = (values - np.repeat(z, block, axis=1)[:, :k]).astype(np.float32) * np.repeat(s, block, axis=1)[:, :k]
        return [c.emit("Gather", [c.const(w, "table"), indices], {"axis": 0}, out=c.outputs[0], main=True)]
    centred = values - implied                   # the signed codes these stand for
    qw = pack_int4(centred) if bits == 4 else centred.astype(np.int8)
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "format": "int"}
    return [c.fused("QuantGather", [indices, c.const(qw, "qweight"), c.const(s, "scales")], attrs, out=c.outputs[0])]

"""QuantMatMul: y = x @ dequantize(W)^T (+ bias), a linear layer over weight-only quantized weights;
QuantGather: y = dequantize(W)[indices], an embedding table in the same layout (one row per token).

The one form every quantized linear layer takes in the IR: ONNX Runtime's
`com.microsoft::MatMulNBits`, `DequantizeLinear` (block-wise, opset 21+) feeding
MatMul/Gemm, and `polyport compile --quantize` all become it, so targets lower one op.

Weight layout (`qweight`, one row per output column n, K along the row):
  bits 4: uint8 [N, ceil(K/2)], element k in byte k // 2, low nibble for even k;
  bits 8: [N, K] bytes: uint8 (format uint / fp8e4m3, the e4m3fn bit pattern) or int8 (format int);
  bits 16: [N, K] float16 (format f16) or uint16 (format bf16, the bfloat16 bit pattern): the weights
  themselves (`polyport compile --dtype`), no scales or zeros (block_size = K).
`scales` [N, KB] and optional `zeros` [N, KB] (float) hold one value per block of
`block_size` consecutive k (KB = ceil(K / block_size)):
  W[n, k] = (decode(q[n, k]) - zero[n, k // block_size]) * scale[n, k // block_size]
decode: `uint` unsigned integer, `int` two's-complement integer, `fp8e4m3` float8 e4m3fn, `f16`, `bf16`.
Without `zeros` the zero is 2^(bits-1) for `uint` (MatMulNBits' default) and 0 otherwise.

QuantGather (`polyport compile --quantize-embeddings`) reads a token-embedding table [N = vocab, K = hidden]
stored exactly so, groups along hidden: a Gather (axis 0) that dequantizes only the rows it gathers.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from ..dtypes import F32
from ..ops import AttrSpec, define, infers, reference
from ..types import TensorType
from ._util import f32, like, node_error

FORMATS = ("uint", "int", "fp8e4m3", "f16", "bf16")

define("QuantMatMul", inputs=("x", "qweight", "scales?", "zeros?", "bias?"), outputs=("y",),
       attrs={"K": AttrSpec(int, doc="input features"),
              "N": AttrSpec(int, doc="output features"),
              "bits": AttrSpec(int, doc="4 | 8 | 16"),
              "block_size": AttrSpec(int, doc="consecutive k sharing one scale (and zero)"),
              "format": AttrSpec(str, "uint", doc="uint | int | fp8e4m3 | f16 | bf16: how a stored code decodes")},
       doc="Linear layer over block-quantized weights, dequantized on the fly.")

define("QuantGather", inputs=("indices", "qweight", "scales?"), outputs=("y",),
       attrs={"K": AttrSpec(int, doc="row length (hidden)"),
              "N": AttrSpec(int, doc="rows (vocab)"),
              "bits": AttrSpec(int, doc="4 | 8 | 16"),
              "block_size": AttrSpec(int, doc="consecutive k sharing one scale"),
              "format": AttrSpec(str, doc="how a stored code decodes (symmetric: no zeros)",
                                 choices=("int", "fp8e4m3", "f16", "bf16"))},
       doc="Gather (axis 0) over a block-quantized table, dequantizing only the gathered rows.")


@infers("QuantMatMul", domain="polyport")
def _infer(node, ctx):
    x = node.inputs[0].type
    n = int(node.attrs["N"])
    return [TensorType(x.dtype, None if x.shape is None else x.shape[:-1] + (n,))]


def codes(qweight: np.ndarray, bits: int, fmt: str, k: int) -> np.ndarray:
    """The stored codes decoded to float32, [N, K]."""
    q = np.asarray(qweight)
    if bits == 4:
        b = q.astype(np.uint8)
        c = np.stack([b & 15, b >> 4], axis=-1).reshape(q.shape[0], -1)[:, :k].astype(np.int16)
        if fmt == "int":
            c = np.where(c >= 8, c - 16, c)
        return c.astype(np.float32)
    if fmt == "fp8e4m3":
        return q.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    if fmt == "bf16":
        return q.view(ml_dtypes.bfloat16).astype(np.float32)
    return q.astype(np.float32)


def dequantize(qweight, scales, zeros, *, K: int, bits: int, block_size: int, format: str = "uint",
               **_) -> np.ndarray:
    """The float32 weight [N, K] a QuantMatMul's stored operands mean."""
    c = codes(qweight, bits, format, K)
    if scales is None:
        return c
    if zeros is None:
        z = np.float32(2 ** (bits - 1) if format == "uint" else 0)
    else:
        z = np.repeat(f32(zeros), block_size, axis=1)[:, :K]
    s = np.repeat(f32(scales), block_size, axis=1)[:, :K]
    return (c - z) * s


@reference("QuantMatMul", domain="polyport")
def quant_matmul(node, inputs, ctx):
    x, qweight = inputs[:2]
    scales = inputs[2] if len(inputs) > 2 else None
    zeros = inputs[3] if len(inputs) > 3 else None
    bias = inputs[4] if len(inputs) > 4 else None
    w = dequantize(qweight, scales, zeros, **node.attrs)
    y = f32(x) @ w.T
    if bias is not None:
        y = y + f32(bias)
    return [like(y, x)]


@infers("QuantGather", domain="polyport")
def _infer_gather(node, ctx):
    ids = node.inputs[0].type
    return [TensorType(F32, None if ids.shape is None else ids.shape + (int(node.attrs["K"]),))]


@reference("QuantGather", domain="polyport")
def quant_gather(node, inputs, ctx):
    ids, qweight = np.asarray(inputs[0]), inputs[1]
    scales = inputs[2] if len(inputs) > 2 else None
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -node.attrs["N"] or flat.max() >= node.attrs["N"]):
        raise node_error(node, f"index out of range [{-node.attrs['N']}, {node.attrs['N']})")
    rows = np.take(qweight, flat, axis=0)
    srows = None if scales is None else np.take(scales, flat, axis=0)
    y = dequantize(rows, srows, None, **node.attrs)
    return [y.reshape(ids.shape + (int(node.attrs["K"]),)).astype(np.float32)]

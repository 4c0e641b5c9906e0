"""DequantizeLinear (a constant quantized weight) feeding MatMul / Gemm -> polyport::QuantMatMul.

What a QDQ export or ORT's quantizer with `quant_format=QDQ` writes: W = DequantizeLinear(q, scale,
zero) with blocks along K (`block_size`, opset 21+), per output channel or per tensor, then Y = X @ W
(MatMul) or Y = X W^T + C (Gemm, transB=1, alpha=beta=1). The codes move into QuantMatMul's layout
(ir/quant_layout.py) unchanged; the importer never folds such a DequantizeLinear (ir/fold.py), so no
f32 copy of the weight exists at any point. A weight an export dequantizes with ordinary ops (DeepSeek's
FP8 128x128 blocks: a Cast of the codes times expanded scales) is read back as codes and block scales
(passes/block_dequant.py) and taken the same way.
"""
from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node
from ..ir.quant_layout import QuantWeight, dq_format, from_dequantize_linear
from ..ir.types import TensorType
from .block_dequant import block_codes, computed_from_codes
from .manager import PassResult, register_pass
from .pattern import NoMatch
from .region import replace_with_fused


def _weight(dq: Node, k_axis: int) -> QuantWeight:
    """The DequantizeLinear's weight in QuantMatMul's layout; raises NoMatch."""
    q, scale = dq.inputs[0], dq.inputs[1]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if not (q.is_constant and scale.is_constant and (zero is None or zero.is_constant)):
        raise NoMatch("weight, scale or zero point is not a constant")
    if q.const.ndim != 2 or dq_format(q.const.dtype) is None:
        raise NoMatch(f"weight of dtype {q.const.dtype} / rank {q.const.ndim} (takes 2-D int4, uint4, int8, uint8, e4m3fn)")
    k = q.const.shape[k_axis]
    if dq_format(q.const.dtype)[0] == 4 and k % 2:
        raise NoMatch(f"int4 weight with odd K={k}")
    axis = dq.attrs.get("axis", 1) % 2
    block = int(dq.attrs.get("block_size", 0))
    s = np.asarray(scale.const, np.float32)
    z = None if zero is None else np.asarray(zero.const)
    if s.ndim == 2 and block and axis == k_axis:                 # blocked along K
        pass
    elif s.ndim <= 1 and axis != k_axis:                          # per output channel (or per tensor)
        block = k
        shape = (1, q.const.shape[1 - k_axis]) if k_axis == 0 else (q.const.shape[0], 1)
        s = np.broadcast_to(s.reshape(-1), shape[1 - k_axis]).reshape(shape)
        z = None if z is None else np.broadcast_to(z.reshape(-1), shape[1 - k_axis]).reshape(shape)
    else:
        raise NoMatch(f"scale of shape {list(s.shape)} with axis={axis}, block_size={block}")
    return from_dequantize_linear(q.const, s, z, block, k_axis)


def _block_weight(graph: Graph, w, k_axis: int) -> tuple[QuantWeight, str]:
    """A 2-D weight computed from low-bit codes by ordinary ops, in QuantMatMul's layout, and the codes'
    name; raises NoMatch."""
    if w.type.rank != 2:
        raise NoMatch(f"weight %{w.name} of rank {w.type.rank}")
    b = block_codes(w, k_axis, graph.opset_imports)
    return from_dequantize_linear(b.codes, b.scales, None, b.block_size, k_axis), b.name


def _gemm_ok(node: Node) -> bool:
    a = node.attrs
    c = node.inputs[2] if len(node.inputs) > 2 else None
    return (not a.get("transA", 0) and a.get("transB", 0) and a.get("alpha", 1.0) == 1.0
            and (c is None or a.get("beta", 1.0) == 1.0) and (c is None or c.type.rank == 1))


@register_pass("quant-matmul")
def quant_matmul(graph: Graph) -> PassResult:
    """MatMul / Gemm over a DequantizeLinear'd constant weight, or one computed from low-bit codes times block
    scales -> QuantMatMul."""
    result = PassResult()
    for node in list(graph.nodes):
        if node.qualified_op not in ("MatMul", "Gemm") or node.graph is not graph:
            continue
        w = node.inputs[1]
        dq = w.producer if w is not None else None
        is_dq = dq is not None and dq.qualified_op == "DequantizeLinear"
        if not is_dq and not computed_from_codes(w):
            continue
        try:
            if node.op_type == "Gemm" and not _gemm_ok(node):
                raise NoMatch("Gemm with transA, transB=0, alpha or beta != 1 stays as is")
            k_axis = 1 if node.op_type == "Gemm" else 0
            qw, base = (_weight(dq, k_axis), dq.inputs[0].name) if is_dq else _block_weight(graph, w, k_axis)
        except NoMatch as e:
            result.notes.append(f"{node.name}: {e}")
            continue
        x = node.inputs[0]
        if not isinstance(x.type, TensorType) or x.type.rank is None or x.type.rank < 1 or x.dtype is None \
                or x.dtype.name not in ("f32", "f16"):
            continue
        ins = [x, graph.add_constant(graph.unique_name(f"{base}/qweight"), qw.qweight),
               graph.add_constant(graph.unique_name(f"{base}/scales"), qw.scales),
               None if qw.zeros is None else graph.add_constant(graph.unique_name(f"{base}/zeros"), qw.zeros),
               node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None]
        while ins[-1] is None:
            ins.pop()
        replace_with_fused(node.outputs[0], "QuantMatMul", ins, qw.attrs)
        result.count("QuantMatMul")
    if result.modified:
        graph.remove_unused()
    return result

"""MatMul, and the dense-weight layout the cpu kernel set binds: [K, N] pre-packed as [N/NB, K, NB], and
per-head weights [H, K, N] (MLA's absorbed decode) and f32 MoE experts [E, K, N] as [H | E, N/NB, K, NB]."""
from __future__ import annotations

from ...ir.fused.moe import EXPERT_WEIGHTS, quantized
from ...ir.graph import Node, Value
from ...ir.types import TensorType
import numpy as np

from . import lowers

PACKED_WEIGHTS = ("cpu",)      # the kernel sets whose dense lowerings read [.., K, N] weights as [.., N/NB, K, NB]
HALF = ("float16", "bfloat16")


@lowers("MatMul")
def matmul(lw, node):
    a, b = (lw.get(v) for v in node.inputs)
    if dense_operands(node):
        from ..kernels.cpu import mlp          # dense layer with constant weights: the scheduled GEMM kernel
        x2, shape = flatten2d(lw, a)
        if node.inputs[1].name in lw.packed:
            y = packed_gemm(lw, x2, [b], "dense_packed")
            n = lw.shape(b)[0] * lw.shape(b)[2]
        else:
            y = lw.bb.emit_te(mlp.matmul, x2, b, primfunc_name_hint="dense")
            n = lw.shape(b)[-1]
        out = shape[:-1] + [lw.simplify(n)]
        return lw.emit(lw.relax.op.reshape(y, out)) if len(shape) != 2 else y
    if node.inputs[1].name in lw.packed and per_head_operands(node):
        return per_head_gemm(lw, a, b)
    return accumulating_matmul(lw, a, b, a.ty.dtype)


def accumulating_matmul(lw, a, b, dtype: str):
    """a @ b; 16-bit operands (passes/compute_dtype.py) accumulate in f32 and store in `dtype`."""
    op = lw.relax.op
    return lw.emit(op.astype(op.matmul(a, b, out_dtype="float32"), dtype) if dtype in HALF else op.matmul(a, b))


def flatten2d(lw, x):
    shape = lw.shape(x)
    if len(shape) == 2:
        return x, shape
    m = 1
    for d in shape[:-1]:
        m = m * d
    return lw.emit(lw.relax.op.reshape(x, [lw.simplify(m), shape[-1]])), shape


def packed_gemm(lw, x2, ws, name: str, **gate):
    """x2 [M, K] times pre-packed weights [N/NB, K, NB] (one: dense; two: GatedMLP's gate and up,
    `gate` = act / clamp) through kernels/cpu/gemm.py."""
    from ..kernels.cpu import gemm
    no, kdim, nb = (lw.as_int(d) for d in lw.shape(ws[0]))
    func = gemm.dense_packed_func(kdim, no, nb, dtype=x2.ty.dtype, gated=len(ws) == 2, **gate)
    gv = lw.add_kernel(func, name)
    out = lw.relax.TensorType(shape=[lw.shape(x2)[0], lw.simplify(no * nb)], dtype=x2.ty.dtype)
    return lw.emit(lw.relax.call_tir(gv, [x2] + list(ws), out))


def per_head_gemm(lw, x, wp):
    """x [B, H, S, K] times per-head weights pre-packed as [H, N/NB, K, NB] through kernels/cpu/gemm.py."""
    from ..kernels.cpu import gemm
    h, no, kdim, nb = (lw.as_int(d) for d in lw.shape(wp))
    func = gemm.per_head_packed_func(h, kdim, no, nb, dtype=x.ty.dtype)
    gv = lw.add_kernel(func, "per_head_packed")
    b, _, s, _ = lw.shape(x)
    out = lw.relax.TensorType(shape=[b, lw.simplify(h), s, lw.simplify(no * nb)], dtype=x.ty.dtype)
    return lw.emit(lw.relax.call_tir(gv, [x, wp], out))


def per_head_operands(node: Node) -> bool:
    """MatMul(x [B, H, S, K], W [H, K, N]) with W a constant f32 weight and H, K static: one product per head."""
    bt, at = node.inputs[1].type, node.inputs[0].type
    return (node.inputs[1].is_constant and isinstance(bt, TensorType) and bt.rank == 3
            and isinstance(at, TensorType) and at.rank == 4 and at.dtype == bt.dtype and str(at.dtype) == "f32"
            and isinstance(at.shape[1], int) and isinstance(at.shape[3], int)
            and at.shape[1] == bt.shape[0] and at.shape[3] == bt.shape[1])


def dense_operands(node: Node) -> bool:
    """MatMul(x, W) with W a constant 2-D weight and x of rank >= 2, both f32 (or both 16-bit floats:
    passes/compute_dtype.py): the dense GEMM kernel, accumulating in f32."""
    bt, at = node.inputs[1].type, node.inputs[0].type
    return (node.inputs[1].is_constant and isinstance(bt, TensorType) and bt.rank == 2
            and isinstance(at, TensorType) and at.rank is not None and at.rank >= 2
            and at.dtype == bt.dtype and str(at.dtype) in ("f32", "f16", "bf16") and node.inputs[0] is not node.inputs[1])


def gated_packable(node: Node) -> bool:
    """A GatedMLP whose three weights are distinct f32 2-D constants with N divisible by the same NB."""
    from ..kernels.cpu import mlp
    ws = node.inputs[1:4]
    if not all(w is not None and w.is_constant and w.const.ndim == 2 and w.const.dtype == np.float32 for w in ws):
        return False
    if len({id(w) for w in ws}) != 3 or str(node.inputs[0].dtype) != "f32":
        return False
    nbs = {mlp.pack_block(ws[0].const.shape[1]), mlp.pack_block(ws[1].const.shape[1])}
    return len(nbs) == 1 and 0 not in nbs and mlp.pack_block(ws[2].const.shape[1]) > 0


def moe_packable(node: Node) -> bool:
    """An unquantized MoE whose three expert weights are distinct f32 [E, K, N] constants with N divisible by the
    same NB: bound [E, N/NB, K, NB], its expert GEMMs run as register tiles (kernels/cpu/moe.py)."""
    from ..kernels.cpu import mlp
    ws = [node.inputs[i] for i in EXPERT_WEIGHTS]          # required operands: always present
    if quantized(node) or not all(w is not None and w.is_constant and w.const.ndim == 3
                                  and w.const.dtype == np.float32 for w in ws):
        return False
    nbs = {mlp.pack_block(w.const.shape[-1]) for w in ws}
    return len({id(w) for w in ws}) == 3 and len(nbs) == 1 and 0 not in nbs


def packable(lw, v: Value) -> int:
    """NB if every use of weight `v` is as the B operand of a dense MatMul, a weight of a packable GatedMLP,
    or, for a 3-D weight, the B operand of a per-head MatMul or an expert weight of a packable MoE (then it is
    bound pre-packed)."""
    from ..kernels.cpu import mlp
    if lw.kernels not in PACKED_WEIGHTS or v.is_graph_output or v.const.ndim not in (2, 3) or not v.uses \
            or v.const.dtype != np.float32:
        return 0
    operands = dense_operands if v.const.ndim == 2 else per_head_operands
    for node, i in v.uses:
        if node.graph is not lw.graph:
            return 0
        if node.qualified_op == "polyport::GatedMLP" and i in (1, 2, 3) and gated_packable(node):
            continue
        if node.qualified_op == "polyport::MoE" and i in EXPERT_WEIGHTS and moe_packable(node):
            continue
        if node.qualified_op != "MatMul" or i != 1 or not operands(node):
            return 0
    return mlp.pack_block(v.const.shape[-1])

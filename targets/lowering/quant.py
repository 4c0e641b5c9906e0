"""polyport::QuantMatMul and QuantGather: the codes stay codes up to the kernel.

With the cpu kernel set, a QuantMatMul whose N splits into vector-wide column blocks and whose K
packs whole bytes runs kernels/cpu/quant_gemm.py over operands the loader binds column-blocked
([N, X] stored, [N/NB, X, NB] bound: `packed_rows` in model.json); otherwise the TE compute of
kernels/portable/quant.py reads them as stored. Either way the operands are parameters, never
constants folded into the library. A QuantGather (a quantized embedding table) decodes only the rows it
gathers (kernels/portable/quant.py's TE compute, every target), reading its operands as stored or, when a
tied LM head's QuantMatMul shares them, in that kernel's column-blocked layout.
"""
from __future__ import annotations

import numpy as np

from ...ir.fused.moe import EXPERT_WEIGHTS, quantized
from ...ir.fused.moe import SCALES as MOE_SCALES
from ...ir.ops import attrs_of
from . import lowers
from .dense import PACKED_WEIGHTS, flatten2d

OP = "polyport::QuantMatMul"
GATHER = "polyport::QuantGather"
ANY = "any"                          # a QuantGather reads the layout its table's other users want
WEIGHT_OPERANDS = (1, 2, 3)          # qweight, scales, zeros
GATED_WEIGHTS = (1, 2, 3)            # a quantized GatedMLP's codes (its scales follow at 4, 5, 6)


def _packed_nb(lw, node) -> int:
    from ..kernels.cpu.quant_gemm import column_block
    a = attrs_of(node)
    per_byte = 2 if a["bits"] == 4 else 1
    if lw.kernels not in PACKED_WEIGHTS or a["K"] % per_byte or a["block_size"] % per_byte:
        return 0
    return column_block(int(a["N"]))


def _gated_nb(lw, node) -> int:
    """NB for a quantized GatedMLP's operands (K first, [K, N] -> [N/NB, K, NB]), 0 to bind them as stored."""
    from ..kernels.cpu.quant_gemm import column_block
    if lw.kernels not in PACKED_WEIGHTS:
        return 0
    nbs = {column_block(int(node.inputs[i].const.shape[-1])) for i in GATED_WEIGHTS}
    return nbs.pop() if len(nbs) == 1 else 0


def _moe_nb(lw, node) -> int:
    """NB for a quantized MoE's codes and scales ([E, X, N] -> [E, N/NB, X, NB]: each column block of an expert
    contiguous, as the byte-dot GEMVs read it), 0 to bind them as stored (kernels/cpu/moe.py `column_blocked`)."""
    from ..kernels.cpu.moe import column_blocked
    if lw.kernels not in PACKED_WEIGHTS:
        return 0
    a = attrs_of(node)
    wg, wd = node.inputs[EXPERT_WEIGHTS[0]].const, node.inputs[EXPERT_WEIGHTS[2]].const
    per_byte = 2 if a["bits"] == 4 else 1
    return column_blocked(a["bits"], a["format"], a["block_size"], wg.shape[1] * per_byte, wg.shape[2], wd.shape[2])


def _layout(lw, node, i):
    """(NB, K first) for operand i of node as a quantized weight operand (NB 0: bound as stored), ANY for a
    QuantGather's, None if it is not one."""
    if node.graph is not lw.graph:
        return None
    if node.qualified_op == OP and i in WEIGHT_OPERANDS:
        return _packed_nb(lw, node), False
    if node.qualified_op == GATHER and i >= 1:          # either layout (a tied LM head's, or as stored)
        return ANY
    if node.qualified_op == "polyport::MoE" and quantized(node) and (i in EXPERT_WEIGHTS or i in MOE_SCALES):
        return _moe_nb(lw, node), True
    if node.qualified_op == "polyport::GatedMLP" and node.attrs.get("bits", 0) and i >= 1:
        return _gated_nb(lw, node), True
    return None


def param_layout(lw, v):
    """For a constant used only as a quantized weight operand (QuantMatMul's, a quantized GatedMLP's or MoE's,
    the MoE's scales included): (NB, K first) to bind it column-blocked (NB 0: as stored). None for any other
    constant."""
    if not v.uses or v.is_graph_output:
        return None
    layouts = {_layout(lw, node, i) for node, i in v.uses}
    if None in layouts:
        return None
    layouts.discard(ANY)
    return layouts.pop() if len(layouts) == 1 else (0, False)


def quant_dense(lw, x2, q, s, z, bias, a: dict, *, packed: bool, k_major: bool = False):
    """x2 [M, K] @ dequantize(q, s, z) (+ bias) -> [M, N]: the cpu kernel over column-blocked operands
    (`packed`), else the portable TE compute over them as stored ([N, K], or [K, N] with `k_major`)."""
    relax = lw.relax
    N = int(a["N"])
    if bias is not None and bias.ty.dtype != "float32":
        bias = lw.emit(relax.op.astype(bias, "float32"))
    if packed:
        from ..kernels.cpu import quant_gemm
        no, _, nb = (lw.as_int(d) for d in lw.shape(q))
        func = quant_gemm.quant_dense_func(int(a["K"]), no, nb, int(a["bits"]), int(a["block_size"]),
                                           a["format"], z is not None, bias is not None,
                                           dtype=x2.ty.dtype)
        gv = lw.add_kernel(func, "quant_dense")
        none = relax.const(np.zeros(1, np.float32))
        out = relax.TensorType(shape=[lw.shape(x2)[0], N], dtype=x2.ty.dtype)
        return lw.emit(relax.call_tir(gv, [x2, q, none if s is None else s, none if z is None else z,
                                           none if bias is None else bias], out))
    from ..kernels.portable import quant
    attrs = {k: a[k] for k in ("K", "N", "bits", "block_size")}

    def fn(x, q, *rest):
        it = iter(rest)
        ss, zz, bb = (next(it) if t is not None else None for t in (s, z, bias))
        return quant.quant_matmul(x, q, ss, zz, bb, format=a["format"], k_major=k_major, **attrs)

    return lw.bb.emit_te(fn, *[t for t in (x2, q, s, z, bias) if t is not None], primfunc_name_hint="quant_matmul")


@lowers(OP)
def quant_matmul(lw, node):
    relax = lw.relax
    a = attrs_of(node)
    x2, shape = flatten2d(lw, lw.get(node.inputs[0]))
    if x2.ty.dtype not in ("float32", "float16", "bfloat16"):
        raise lw.unsupported(node, f"activations of dtype {x2.ty.dtype} (takes f32, f16, bf16)")
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    q, s, z, bias = (None if v is None else lw.get(v) for v in ins[1:5])
    y = quant_dense(lw, x2, q, s, z, bias, a, packed=bool(lw.packed_rows.get(node.inputs[1].name)))
    return lw.emit(relax.op.reshape(y, shape[:-1] + [int(a["N"])])) if len(shape) != 2 else y


@lowers(GATHER)
def quant_gather(lw, node):
    """The table's rows, decoded where gathered; its codes bound as stored or, shared with a tied LM head's
    QuantMatMul, column-blocked as that kernel binds them."""
    from ..kernels.portable import quant
    a = attrs_of(node)
    ops = [v for v in node.inputs[1:] if v is not None]
    attrs = {k: a[k] for k in ("K", "N", "bits", "block_size", "format")}
    attrs["row_block"] = lw.packed_rows.get(node.inputs[1].name, 0)

    def fn(ids, q, s=None):
        return quant.quant_gather(ids, q, s, **attrs)

    return lw.bb.emit_te(fn, lw.get(node.inputs[0]), *[lw.get(v) for v in ops], primfunc_name_hint="quant_gather")

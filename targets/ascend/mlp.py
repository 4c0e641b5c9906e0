"""GatedMLP -> MatMul (gate|up concatenated) -> SwiGlu -> MatMul, and the gated activations MoE shares."""
from __future__ import annotations

import math
import warnings

import numpy as np
from onnx import helper

from ...errors import PolyportError
from ...ir.graph import Node, Value
from ...ir.ops import attrs_of
from . import limits as L
from .emission import CANN_DOMAIN, decomposes, dims, lowers, tname


# ---- gated activations (SwiGlu, clamp and non-SiLU fallbacks) --------------------------------
def gated(em, node: Node, h: str, rows: list, inter: int, activation: str, clamp: float) -> str:
    cd = em.compute
    em.check(node, "SwiGlu", {"dtype": tname(cd), "split_dim_even": True})
    if not clamp and activation == "silu":
        return em.emit("SwiGlu", [h], [(em.fresh(f"{node.name}_swiglu"), cd, rows + [inter])],
                         {"dim": -1}, CANN_DOMAIN)[0]
    split = em.ints([inter, inter], f"{node.name}_split")
    g, u = em.emit("Split", [h, split], [(em.fresh(f"{node.name}_gate"), cd, rows + [inter]),
                                           (em.fresh(f"{node.name}_up"), cd, rows + [inter])], {"axis": -1},
                     note="split gate|up")
    if clamp:
        c = em.const(np.asarray(clamp, helper.tensor_dtype_to_np_dtype(cd)), f"{node.name}_clamp")
        nc = em.const(np.asarray(-clamp, helper.tensor_dtype_to_np_dtype(cd)), f"{node.name}_nclamp")
        g = em.emit("Min", [g, c], [(em.fresh(f"{node.name}_gate_clamped"), cd, rows + [inter])],
                      note="SwiGLU limit: CANN's SwiGlu has no clamp")[0]
        u = em.emit("Clip", [u, nc, c], [(em.fresh(f"{node.name}_up_clamped"), cd, rows + [inter])],
                      note="SwiGLU limit: CANN's SwiGlu has no clamp")[0]
    if activation == "silu":
        both = em.emit("Concat", [g, u], [(em.fresh(f"{node.name}_gate_up"), cd, rows + [2 * inter])],
                         {"axis": -1})[0]
        return em.emit("SwiGlu", [both], [(em.fresh(f"{node.name}_swiglu"), cd, rows + [inter])],
                         {"dim": -1}, CANN_DOMAIN)[0]
    msg = (f"node {node.name}: CANN SwiGlu is SiLU-only, activation {activation!r}; used fallback: "
           "decomposed standard ops (Erf/Tanh, Mul, Add)")
    warnings.warn(msg, L.AscendFallbackWarning, stacklevel=2)
    em.fallbacks.append({"node": node.name, "cann_op": "SwiGlu", "limit": "activation silu",
                           "actual": activation, "fallback": "decomposed standard ops", "message": msg})
    if activation not in ("gelu", "gelu_tanh"):
        raise PolyportError(f"node {node.name}: unknown activation {activation!r}")
    act = gelu(em, g, node.name, cd, rows + [inter], tanh=activation == "gelu_tanh")
    return em.emit("Mul", [act, u], [(em.fresh(f"{node.name}_gated"), cd, rows + [inter])])[0]


def gelu(em, x: str, base: str, cd: int, sh, *, tanh: bool, out=None) -> str:
    """GELU in opset-18 ops (CANN's list has no Gelu): 0.5 x (1 + erf(x / sqrt 2)), or the tanh form."""
    npd = helper.tensor_dtype_to_np_dtype(cd)
    if not tanh:
        t = em.emit("Div", [x, em.const(np.asarray(math.sqrt(2.0), npd), f"{base}_sqrt2")],
                    [(em.fresh(f"{base}_gs"), cd, sh)])[0]
        t = em.emit("Erf", [t], [(em.fresh(f"{base}_erf"), cd, sh)])[0]
    else:
        cube = em.emit("Mul", [x, x], [(em.fresh(f"{base}_g2"), cd, sh)])[0]
        cube = em.emit("Mul", [cube, x], [(em.fresh(f"{base}_g3"), cd, sh)])[0]
        cube = em.emit("Mul", [cube, em.const(np.asarray(0.044715, npd), f"{base}_c")],
                       [(em.fresh(f"{base}_g3c"), cd, sh)])[0]
        t = em.emit("Add", [x, cube], [(em.fresh(f"{base}_inner"), cd, sh)])[0]
        t = em.emit("Mul", [t, em.const(np.asarray(0.7978845608028654, npd), f"{base}_k")],
                    [(em.fresh(f"{base}_inner2"), cd, sh)])[0]
        t = em.emit("Tanh", [t], [(em.fresh(f"{base}_tanh"), cd, sh)])[0]
    t = em.emit("Add", [t, em.const(np.asarray(1.0, npd), f"{base}_one")], [(em.fresh(f"{base}_1p"), cd, sh)])[0]
    t = em.emit("Mul", [t, x], [(em.fresh(f"{base}_gx"), cd, sh)])[0]
    return em.emit("Mul", [t, em.const(np.asarray(0.5, npd), f"{base}_half")],
                   [out or (em.fresh(f"{base}_act"), cd, sh)])[0]


@decomposes("Gelu")
def standard_gelu(em, node: Node) -> None:
    """ONNX Gelu (opset 20; ATC takes opset 18): decomposed, computed in the compute dtype."""
    out = em.out(node.outputs[0], em.compute)
    gelu(em, em.get(node.inputs[0], em.compute), node.name, em.compute, out[2],
         tanh=node.attrs.get("approximate", "none") == "tanh", out=out)


def gate_up_weight(em, node: Node, wg: Value, wu: Value, axis: int) -> str:
    if wg.const is None or wu.const is None:
        raise PolyportError(f"node {node.name}: ascend needs constant expert/MLP weights")
    arr = np.concatenate([np.asarray(wg.const), np.asarray(wu.const)], axis=axis)
    return em.const(arr.astype(helper.tensor_dtype_to_np_dtype(em.compute)), f"{node.name}_w_gate_up")


def quantized_gated_mlp(em, node: Node, xs: list, inter: int, a: dict) -> None:
    """Quantized weights (K first, ir/fused/mlp.py): gate and up each a WeightQuantBatchMatmulV2 (quant.py),
    concatenated for SwiGlu, then the down projection's."""
    from .quant import antiquant_matmul
    cd = em.compute
    x = em.get(node.inputs[0], cd)
    per_byte = 2 if a["bits"] == 4 else 1
    q = {k: a[k] for k in ("bits", "block_size", "format")}

    def proj(i, inp, out, tag):
        codes, scales = node.inputs[i].const, node.inputs[i + 3].const
        d = dict(K=codes.shape[0] * per_byte, N=codes.shape[1], **q)
        return antiquant_matmul(em, node, inp, np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T), None,
                                None, d, out, f"{node.name}_{tag}")

    rows = xs[:-1]
    g, u = (proj(i, x, (em.fresh(f"{node.name}_{t}"), cd, rows + [inter]), t) for i, t in ((1, "gate"), (2, "up")))
    h = em.emit("Concat", [g, u], [(em.fresh(f"{node.name}_gate_up"), cd, rows + [2 * inter])], {"axis": -1})[0]
    act = gated(em, node, h, rows, inter, a["activation"], a["clamp"])
    proj(3, act, em.out(node.outputs[0], cd), "down")


# ---- GatedMLP -> MatMul (gate|up) -> SwiGlu -> MatMul ----------------------------------------
@lowers("GatedMLP")
def gated_mlp(em, node: Node) -> None:
    x, wg, wu, wd = node.inputs[:4]
    cd = em.compute
    xs = dims(x.shape)
    inter = wg.shape[-1]
    a = attrs_of(node)
    if a["bits"]:
        return quantized_gated_mlp(em, node, xs, inter, a)
    w = gate_up_weight(em, node, wg, wu, -1)
    h = em.emit("MatMul", [em.get(x, cd), w], [(em.fresh(f"{node.name}_gate_up"), cd,
                                                  xs[:-1] + [2 * inter])], note="gate|up projection")[0]
    a = attrs_of(node)
    act = gated(em, node, h, xs[:-1], inter, a["activation"], a["clamp"])
    em.emit("MatMul", [act, em.get(wd, cd)], [em.out(node.outputs[0], cd)], note="down projection")

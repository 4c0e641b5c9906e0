"""fuse-gated-mlp: down(act(gate(x)) * up(x))  ->  polyport::GatedMLP(x, w_gate, w_up, w_down).

The rule
- anchor: a projection by a constant weight (the down projection) whose input
  is a product with an activation on one side. MoE experts never anchor: their
  weights are gathered per token (GatherND), not constants.
- projections: MatMul(x, W[in, out]), MatMul(x, Transpose(W)), Gemm(x, W, transB)
  with alpha 1 and no bias, or one half of a fused gate/up projection (a Split
  or Slice of MatMul(x, W_gate_up) on the last axis). Weights become [in, out].
  Or all three QuantMatMuls quantized alike (an imported MatMulNBits / DequantizeLinear
  model, passes/quant_matmul.py), without bias or zero points other than the implied
  one: their codes and scales become GatedMLP's quantized operands, K first, unchanged
  in value (centred uint codes are rewritten as the two's-complement codes they equal).
- activation: whatever elementwise function of the gate the exporter spelled,
  named by what it contains (Sigmoid: silu; Erf or Gelu: gelu; Tanh or
  Gelu(approximate=tanh): gelu_tanh) and confirmed numerically.
- clamp (DeepSeek-V4 / gpt-oss SwiGLU limit): Clip/Min/Max with gate <= L and
  -L <= up <= L, GatedMLP's `clamp=L`; any other clamp is left alone.
- meaning: gate and up read the same x, shapes chain ([H, I], [H, I], [I, H']),
  the interior is private; then `equivalent`.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import attrs_of
from ._match_util import const_like, part_of, private, scalar
from .manager import PassResult, register_pass
from .pattern import NoMatch
from .region import equivalent, replace_with_fused

ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Pow", "Neg", "Sigmoid", "Erf", "Tanh", "Gelu"}


def _quant_weight(node: Node) -> Optional[dict]:
    """A QuantMatMul's constant weight as GatedMLP's quantized operands (codes [in / 2 | in, out] and scales
    [KB, out], K first, format int or fp8e4m3), None where GatedMLP cannot hold it (a bias, zero points other
    than the implied one, 16-bit weights)."""
    a = attrs_of(node)
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    q, scales, zeros, bias = ins[1:5]
    if bias is not None or q.const is None or scales is None or scales.const is None or a["bits"] not in (4, 8) \
            or a["format"] not in ("uint", "int", "fp8e4m3") or (a["bits"] == 4 and a["K"] % 2):
        return None
    codes = np.asarray(q.const)
    if a["format"] == "uint":               # centred on 2^(bits-1): the same values as two's-complement codes
        implied = 2 ** (a["bits"] - 1)
        if zeros is not None and (zeros.const is None or np.any(np.asarray(zeros.const) != implied)):
            return None
        codes = codes.view(np.uint8) ^ np.uint8(0x88 if a["bits"] == 4 else 0x80)
        codes = codes.view(np.int8) if a["bits"] == 8 else codes
    elif zeros is not None:
        return None
    return dict(codes=np.ascontiguousarray(codes.T), scales=np.ascontiguousarray(np.asarray(scales.const, np.float32).T),
                attrs={"bits": a["bits"], "block_size": a["block_size"],
                       "format": "fp8e4m3" if a["format"] == "fp8e4m3" else "int"},
                shape=(a["K"], a["N"]))


def _projection(v: Value) -> Optional[tuple]:
    """v = x @ W with W a constant: (x, W as [in, out], the nodes, W's Value if used as is, None), else None.
    A QuantMatMul's weight: (x, its [in, out] shape, the node, None, `_quant_weight`)."""
    node = v.producer
    if node is not None and node.qualified_op == "polyport::QuantMatMul":
        q = _quant_weight(node)
        return None if q is None else (node.inputs[0], SimpleNamespace(shape=q["shape"]), [node], None, q)
    if node is None or node.domain:
        return None
    if node.op_type == "MatMul":
        w = node.inputs[1]
        t = w.producer
        if w.const is None and t is not None and t.op_type == "Transpose" and t.inputs[0].const is not None \
                and list(t.attrs.get("perm", [1, 0])) == [1, 0]:
            return (node.inputs[0], t.inputs[0].const.T, [node, t], None, None) if t.inputs[0].const.ndim == 2 \
                else None
        return (node.inputs[0], w.const, [node], w, None) if w.const is not None and w.const.ndim == 2 else None
    if node.op_type == "Gemm":
        w, bias = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        plain = node.attrs.get("transA", 0) == 0 and node.attrs.get("alpha", 1.0) == 1.0
        no_bias = bias is None or bias.const is not None and not bias.const.any()
        if w.const is None or not plain or not no_bias:
            return None
        trans = node.attrs.get("transB", 0)
        return node.inputs[0], (w.const.T if trans else w.const), [node], (None if trans else w), None
    part = part_of(v)                       # one half of a fused gate/up projection
    inner = _projection(part.source) if part is not None else None
    if inner is None or inner[4] is not None:
        return None
    return inner[0], inner[1][:, list(part.indices)], inner[2] + [node], None, None


def _activation(a: Value) -> Optional[tuple[Value, str, list[Node]]]:
    """a = act(g) for one elementwise function of one value g: (g, activation name, nodes), else None."""
    nodes, leaves, stack = {}, {}, [a]
    while stack and len(nodes) <= 12:
        v = stack.pop()
        n = v.producer
        if v.const is not None:
            continue
        if n is None or n.domain or n.op_type not in ELEMENTWISE:
            leaves[id(v)] = v
            continue
        if id(n) not in nodes:
            nodes[id(n)] = n
            stack.extend(i for i in n.inputs if i is not None)
    kinds = {n.op_type: n for n in nodes.values()}
    if stack or len(leaves) != 1 or not kinds.keys() & {"Sigmoid", "Erf", "Tanh", "Gelu"}:
        return None
    if "Gelu" in kinds:
        name = "gelu_tanh" if kinds["Gelu"].attrs.get("approximate", "none") == "tanh" else "gelu"
    else:
        name = "gelu" if "Erf" in kinds else "gelu_tanh" if "Tanh" in kinds else "silu"
    return next(iter(leaves.values())), name, list(nodes.values())


def _clamp(v: Value) -> tuple[Value, Optional[float], Optional[float], list[Node]]:
    """Strip Clip/Min/Max by constants: (inner value, low, high, nodes)."""
    lo = hi = None
    nodes = []
    while v.producer is not None and not v.producer.domain:
        n = v.producer
        ins = list(n.inputs) + [None, None]
        if n.op_type == "Clip" and all(b is None or scalar(b) is not None for b in ins[1:3]):
            lo = scalar(ins[1]) if ins[1] is not None else lo
            hi = scalar(ins[2]) if ins[2] is not None else hi
        elif n.op_type in ("Min", "Max") and len(n.inputs) == 2 and scalar(n.inputs[1]) is not None:
            lo, hi = (lo, scalar(n.inputs[1])) if n.op_type == "Min" else (scalar(n.inputs[1]), hi)
        else:
            break
        nodes.append(n)
        v = n.inputs[0]
    return v, lo, hi, nodes


def _gated(h: Value) -> Optional[dict]:
    """Read h = act(clamp(gate(x))) * clamp(up(x)): the proposal, None for no candidate; raises NoMatch."""
    mul = h.producer
    if mul is None or mul.op_type != "Mul" or mul.domain:
        return None
    for a, u in (mul.inputs, mul.inputs[::-1]):
        act = _activation(a)
        if act is not None:
            break
    else:
        return None                          # not gated by an activation: not an MLP candidate
    g, name, act_nodes = act
    g, g_lo, g_hi, g_clip = _clamp(g)
    u, u_lo, u_hi, u_clip = _clamp(u)
    gate, up = _projection(g), _projection(u)
    if gate is None or up is None:
        raise NoMatch("gate or up is not x @ W with a constant W and no bias (an MoE expert?)")
    if gate[0] is not up[0]:
        raise NoMatch(f"gate reads %{gate[0].name} but up reads %{up[0].name}")
    if gate[1].shape != up[1].shape:
        raise NoMatch(f"gate weight {gate[1].shape} and up weight {up[1].shape} differ")
    limit = g_hi or 0.0
    if (g_lo, g_hi, u_lo, u_hi) != ((None, None, None, None) if not limit else (None, limit, -limit, limit)):
        raise NoMatch(f"clamps gate to [{g_lo}, {g_hi}], up to [{u_lo}, {u_hi}]: not GatedMLP's (gate<=L, |up|<=L)")
    nodes = [mul] + act_nodes + g_clip + u_clip + gate[2] + up[2]
    return dict(x=gate[0], gate=gate, up=up, activation=name, clamp=limit, nodes=nodes)


@register_pass("fuse-gated-mlp")
def fuse_gated_mlp(graph: Graph) -> PassResult:
    """down(act(gate(x)) * up(x))  ->  polyport::GatedMLP (dense MLPs and shared experts)."""
    result = PassResult()
    for node in graph.nodes:
        if node.graph is not graph or node.qualified_op not in ("MatMul", "Gemm", "polyport::QuantMatMul"):
            continue
        down = _projection(node.outputs[0])
        if down is None or down[0].producer is None or down[0].producer.op_type != "Mul":
            continue
        try:
            if _fuse(graph, node, down):
                result.count("GatedMLP")
        except NoMatch as e:
            result.notes.append(f"{node.name}: {e}")
    graph.remove_unused()
    return result


def _fuse(graph: Graph, node: Node, down) -> bool:
    """Fuse the MLP whose down projection is `node` (False: no candidate); raises NoMatch."""
    try:
        p = _gated(down[0])
    except NoMatch as e:
        raise NoMatch(f"gated product feeds a projection, but {e}") from None
    if p is None:
        return False
    inter, wd = p["gate"][1].shape[1], down[1]
    if wd.shape[0] != inter:
        raise NoMatch(f"down weight {wd.shape} does not take the {inter} gated features")
    if not private(p["nodes"] + down[2], node):
        raise NoMatch("an intermediate value of the MLP is used outside it")
    projections = (("w_gate", p["gate"]), ("w_up", p["up"]), ("w_down", down))
    attrs = {"activation": p["activation"]} | ({"clamp": p["clamp"]} if p["clamp"] else {})
    quant = [proj[4] for _, proj in projections]
    if any(q is not None for q in quant):      # QuantMatMuls: their codes and scales, K first
        if any(q is None for q in quant) or len({tuple(q["attrs"].items()) for q in quant}) != 1:
            raise NoMatch("gate, up and down are not all quantized the same way")
        weights = [const_like(graph, f"{node.name}_{kind}", q["codes"]) for (kind, _), q in zip(projections, quant)] \
            + [const_like(graph, f"{node.name}_{kind}_scales", q["scales"]) for (kind, _), q in zip(projections, quant)]
        attrs |= quant[0]["attrs"]
    else:
        weights = [proj[3] or const_like(graph, f"{node.name}_{kind}", proj[1])   # [in, out], as GatedMLP wants
                   for kind, proj in projections]
    x = p["x"]
    try:
        equivalent([x], node.outputs[0], "GatedMLP", [x, *weights], attrs)
    except NoMatch as e:
        raise NoMatch(f"not equivalent to GatedMLP{attrs}: {e}") from None
    replace_with_fused(node.outputs[0], "GatedMLP", [x, *weights], attrs)
    return True

"""The graph's cost model: FLOPs and bytes moved, as polynomials in the input symbols (e.g. `seq`).

Counted per node, for the top-level graph (subgraph bodies of If/Loop/Scan are
not counted: their trip counts are data):

- MatMul, QuantMatMul: 2 * numel(out) * K; Gemm: 2 * M * N * K.
- Attention: 2 * B * H * S * Skv * (Dqk + Dv), halved when causal (the softmax
  is not counted; a sliding window is not subtracted).
- MoE: tokens * top_k * 3 * H * I * 2 (the routed experts) + 2 * tokens * H * E
  (the router). GatedMLP: 2 * T * H * I * 2 + 2 * T * I * H_out.
- RMSNorm: 4 FLOPs per element; Rotary: 3 per element; elementwise ops and
  reductions: 1 per element; data movement: 0.
- Bytes: every weight read once (`weight_bytes`) + each node's activations in
  and out. Views (Reshape, Squeeze, Unsqueeze, ...) move nothing. A weight that
  is only gathered from (an embedding table, or a QuantGather's codes and scales)
  counts as the rows gathered (the Gather's output), not the whole table. The
  routed experts' weights are not in `bytes`: the `moe` entries let the roofline
  count min(E, tokens * top_k) experts read, which is what a decode step (seq 1)
  actually touches.

`graph_cost(graph)` is what the compiler stores in the manifest (top-level key
"cost"); `runtime/roofline.py` evaluates it for a device and a length.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import attrs_of
from ..ir.symbolic import Dim, SymExpr, add, floordiv, mul, parse
from ..ir.types import TensorType

COST_VERSION = 1

# Ops whose output is a view of (or metadata about) the input: no bytes move.
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant",
            "ShapeValue", "Dropout"}
ELEMENTWISE_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Neg", "Abs", "Relu", "Sigmoid",
    "Tanh", "Erf", "Cos", "Sin", "Where", "Max", "Min", "Clip", "Gelu", "HardSigmoid", "LeakyRelu", "Softplus",
    "Mod", "Floor", "Ceil", "Round", "Sign", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
    "And", "Or", "Not", "Xor", "IsNaN", "IsInf", "Mish", "Elu", "Selu", "Swish", "BitShift",
}
REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare",
              "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ArgMax", "ArgMin", "CumSum", "TopK"}
PER_ELEMENT = {"Softmax": 5, "LogSoftmax": 5, "LayerNormalization": 8, "RMSNormalization": 4,
               "SimplifiedLayerNormalization": 4, "RMSNorm": 4, "Rotary": 3}


@dataclasses.dataclass
class NodeCost:
    node: str
    op: str
    flops: Dim
    bytes: Dim


@dataclasses.dataclass
class MoEWeights:
    """Routed experts of one MoE node: tokens * top_k expert slots over `experts` experts."""
    node: str
    tokens: Dim
    top_k: int
    experts: int
    expert_bytes: int           # weights of one expert (gate + up + down)


# ---- shape helpers -----------------------------------------------------------------------
def _shape(v: Optional[Value]):
    if v is None or not isinstance(v.type, TensorType) or v.type.shape is None:
        return None
    if any(d is None for d in v.type.shape):
        return None
    return v.type.shape


def _prod(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def numel(v: Optional[Value]) -> Optional[Dim]:
    shape = _shape(v)
    return None if shape is None else _prod(shape)


def nbytes(v: Optional[Value]) -> Optional[Dim]:
    """Size of a tensor value in bytes (sub-byte dtypes rounded up per element where not exact)."""
    n = numel(v)
    if n is None or v.type.dtype is None:
        return None
    bits = v.type.dtype.itemsize_bits
    if bits % 8 == 0:
        return mul(n, bits // 8)
    exact = floordiv(mul(n, bits), 8)
    if isinstance(exact, SymExpr) and not exact.is_polynomial:
        return mul(n, -(-bits // 8))
    return exact


class _Unknown(Exception):
    """A shape the cost of this node needs is unknown."""


def _need(x):
    if x is None:
        raise _Unknown
    return x


# ---- FLOPs per op ------------------------------------------------------------------------
def node_flops(node: Node) -> Dim:
    op, ins, outs = node.op_type, node.inputs, node.outputs
    if node.domain == "polyport":
        return _fused_flops(node)
    if node.domain not in ("", "ai.onnx"):
        return 0
    if op == "MatMul":
        a = _need(_shape(ins[0]))
        k = a[-1]
        return mul(2, mul(_need(numel(outs[0])), k))
    if op == "Gemm":
        a = _need(_shape(ins[0]))
        k = a[0] if node.attrs.get("transA", 0) else a[-1]
        return mul(2, mul(_need(numel(outs[0])), k))
    if op in ELEMENTWISE_OPS:
        return _need(numel(outs[0]))
    if op in REDUCE_OPS:
        return _need(numel(ins[0]))
    if op in PER_ELEMENT:
        return mul(PER_ELEMENT[op], _need(numel(outs[0])))
    return 0


def _fused_flops(node: Node) -> Dim:
    op, ins, a = node.op_type, node.inputs, attrs_of(node)
    if op == "Attention":
        b, h, s, dqk = _need(_shape(ins[0]))
        skv = _need(_shape(ins[1]))[2]
        dv = _need(_shape(ins[2]))[3]
        per_pair = add(dqk, dv)
        flops = mul(mul(mul(mul(b, h), mul(s, skv)), per_pair), 2)
        if a["causal"]:
            halved = floordiv(flops, 2)
            flops = halved if halved is not None else mul(mul(mul(b, h), mul(s, skv)), per_pair)
        return flops
    if op == "MoE":
        x = _need(_shape(ins[0]))
        hidden, tokens = x[-1], _prod(x[:-1])
        experts = _need(_shape(ins[1]))[-1]
        inter = _need(_shape(ins[3]))[-1]
        routed = mul(mul(tokens, a["top_k"]), mul(mul(3, hidden), mul(inter, 2)))
        router = mul(2, mul(tokens, mul(hidden, experts)))
        return add(routed, router)
    if op == "QuantMatMul":                  # dequantizing is not counted: the weight bytes are its cost
        return mul(2, mul(_need(numel(node.outputs[0])), a["K"]))
    if op == "GatedMLP":
        x = _need(_shape(ins[0]))
        hidden, tokens = x[-1], _prod(x[:-1])
        inter = _need(_shape(ins[1]))[-1]
        out = _need(_shape(ins[3]))[-1]
        return add(mul(4, mul(tokens, mul(hidden, inter))), mul(2, mul(tokens, mul(inter, out))))
    if op in PER_ELEMENT:
        return mul(PER_ELEMENT[op], _need(numel(node.outputs[0])))
    return 0


# ---- bytes -------------------------------------------------------------------------------
def _activation_bytes(node: Node) -> Dim:
    if node.op_type in VIEW_OPS:
        return 0
    total: Dim = 0
    for v in list(node.inputs) + list(node.outputs):
        if v is None or v.is_constant:
            continue
        total = add(total, _need(nbytes(v)))
    return total


def _gather_only(v: Value) -> bool:
    """A weight every use of which gathers rows from it (an embedding table, f32 or QuantGather's codes)."""
    uses = v.uses
    return bool(uses) and all(n.op_type == "Gather" and i == 0 or n.op_type == "QuantGather" and i >= 1
                              for n, i in uses) and not v.is_graph_output


# ---- the whole graph ---------------------------------------------------------------------
@dataclasses.dataclass
class GraphCost:
    flops: Dim
    activation_bytes: Dim
    weight_bytes: int
    moe: list[MoEWeights]
    nodes: list[NodeCost]
    unknown: list[str]          # nodes left out: a shape their cost needs is unknown
    dtype: str

    @property
    def bytes(self) -> Dim:
        return add(self.activation_bytes, self.weight_bytes)

    def as_manifest(self) -> dict[str, Any]:
        return {
            "version": COST_VERSION,
            "flops": str(self.flops),
            "bytes": str(self.bytes),
            "weight_bytes": int(self.weight_bytes),
            "dtype": self.dtype,
            "moe": [{"node": m.node, "tokens": str(m.tokens), "top_k": m.top_k, "experts": m.experts,
                     "expert_bytes": m.expert_bytes} for m in self.moe],
            "unknown_nodes": len(self.unknown),
        }


def analyze(graph: Graph) -> GraphCost:
    flops: Dim = 0
    act: Dim = 0
    nodes, unknown, moe = [], [], []
    routed: set[str] = set()          # expert weights accounted for in `moe`
    flops_by_dtype: dict[str, Dim] = {}
    for node in graph.nodes:
        try:
            f = node_flops(node)
            b = _activation_bytes(node)
        except _Unknown:
            unknown.append(node.name)
            continue
        if node.domain == "polyport" and node.op_type == "MoE":
            entry = _moe_weights(node)
            if entry is not None:
                moe.append(entry)
                routed.update(v.name for v in _expert_weights(node))
        nodes.append(NodeCost(node.name, node.qualified_op, f, b))
        flops, act = add(flops, f), add(act, b)
        dt = node.inputs[0].dtype if node.inputs and node.inputs[0] is not None else None
        if dt is not None and dt.is_float and f != 0:
            flops_by_dtype[str(dt)] = add(flops_by_dtype.get(str(dt), 0), f)
    weight_bytes = 0
    for v in graph.constants.values():
        if v.name in routed or not (v.uses or v.is_graph_output) or _gather_only(v):
            continue
        weight_bytes += int(np.asarray(v.const).nbytes)
    return GraphCost(flops, act, weight_bytes, moe, nodes, unknown, _dominant_dtype(flops_by_dtype))


def _expert_weights(node: Node) -> list[Value]:
    """A MoE's per-expert operands, of which a token reads its chosen experts' only: gate, up and down
    (f32 or quantized codes), their scales and their biases (ir/fused/moe.py's MOE_INPUTS)."""
    ins = list(node.inputs)
    return [v for v in ins[3:6] + ins[8:11] + ins[12:15] if v is not None]


def _moe_weights(node: Node) -> Optional[MoEWeights]:
    ws = node.inputs[3:6]
    if any(w is None or not w.is_constant for w in ws):
        return None             # expert weights computed in the graph: counted as activations already
    x = _shape(node.inputs[0])
    experts = int(np.asarray(ws[0].const).shape[0])
    total = sum(int(np.asarray(w.const).nbytes) for w in _expert_weights(node))
    return MoEWeights(node.name, _prod(x[:-1]), int(node.attrs["top_k"]), experts, total // experts)


def _dominant_dtype(flops_by_dtype: dict[str, Dim]) -> str:
    """The dtype doing most of the FLOPs (compared at every symbol = 128, a typical prefill)."""
    if not flops_by_dtype:
        return "f32"
    return max(flops_by_dtype, key=lambda k: evaluate(flops_by_dtype[k], {}, default=128))


def graph_cost(graph: Graph) -> dict[str, Any]:
    """The cost summary stored in an artifact's manifest (polynomials as text, e.g. `6291456*seq + 131072`)."""
    return analyze(graph).as_manifest()


def evaluate(poly: Dim | str, bindings: dict[str, int], default: Optional[int] = None) -> int:
    """Value of a cost polynomial (text or Dim) with its symbols bound (unbound ones to `default`)."""
    d = parse(poly) if isinstance(poly, str) else poly
    if not isinstance(d, SymExpr):
        return int(d)
    if default is not None:
        bindings = {**{s: default for s in d.symbols}, **bindings}
    return d.evaluate(bindings)


def manifest_cost(graph: Graph) -> dict[str, Any]:
    """`graph_cost`, or {"error": ...}: a cost-model bug must not fail a compile (bench reports it)."""
    try:
        return graph_cost(graph)
    except Exception as e:  # noqa: BLE001 - recorded in the manifest, shown by `polyport bench`
        return {"version": COST_VERSION, "error": f"cost model failed: {type(e).__name__}: {e}"}

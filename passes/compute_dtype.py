"""Half-precision compute (`polyport compile --dtype f16|bf16` on cuda and rocm): the model's activations
in 16-bit floats between ops, f32 inside them where precision needs it.

The 16-bit region is what the model computes from its hidden states: the values reachable from an
embedding lookup (a Gather over a float constant table) or a float graph input. A node reading a 16-bit
value computes in 16-bit: its f32 operands are Cast (a computed value) or stored (a constant: weights,
norm scales, biases) in that dtype, and its f32 outputs become 16-bit. Kept f32:

- what does not depend on the hidden states: rotary cos / sin tables computed from positions (an f16
  angle at position 1000 would be off by a radian), attention masks;
- standard ops that need f32 range or accumulation (F32_OPS: softmax, reductions, layer norms,
  exp / log / pow, top-k): their 16-bit inputs are Cast to f32 and their results stay f32 until a
  16-bit op reads them;
- the fused ops' operands outside LOW_OPERANDS: the MoE router's weight and biases (its top-k picks the
  experts, and 16-bit scores tie where f32 ones do not; passes/fuse_moe.py), quantized weights' scales,
  attention sinks and masks, rotary tables; fused ops not listed run on f32 inputs;
- the graph's float outputs: Cast back to f32 under their own names, so the signature is unchanged.

Every kernel the fused ops lower to reads its 16-bit operands, accumulates in f32 and stores its
result in 16-bit (targets/kernels/portable, kernels/cpu's TE computes); MatMul outside them does too
(targets/lowering/dense.py). The KV caches of the derived generation programs take the dtype of the
keys and values, so they are 16-bit as well (half the bytes).
"""
from __future__ import annotations

import collections
from typing import Optional

import numpy as np

from ..errors import PolyportError
from ..ir import dtypes
from ..ir.graph import Graph, Node, Value
from ..ir.quant_layout import FLOAT16
from ..ir.types import TensorType
from ..ir.verifier import verify
from .region import tolerance

F16_MAX = float(np.finfo(np.float16).max)
# standard ops computed in f32 when they read 16-bit values
F32_OPS = frozenset({
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "ReduceProd", "LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization",
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "CumSum", "TopK", "Einsum"})
# polyport ops computed with 16-bit operands (by index; the rest keep their dtype, see above)
LOW_OPERANDS: dict[str, tuple[int, ...]] = {
    "polyport::Attention": (0, 1, 2),
    "polyport::CachedAttention": (0, 1, 2, 3, 4),
    "polyport::CacheUpdate": (0, 1),
    "polyport::Rotary": (0,),
    "polyport::RMSNorm": (0, 1),
    "polyport::GatedMLP": (0, 1, 2, 3),
    "polyport::MoE": (0, 3, 4, 5),
    "polyport::QuantMatMul": (0,),
    "polyport::KVCompress": (0, 1),
    "polyport::SparseIndexer": (0, 1),
}


def _f32(v: Optional[Value]) -> bool:
    return v is not None and isinstance(v.type, TensorType) and v.type.dtype == dtypes.F32


def _embedding(node: Node) -> bool:
    """A lookup into a float table: where the hidden states start."""
    return node.op_type == "Gather" and not node.domain and _f32(node.inputs[0]) and node.inputs[0].is_constant \
        and not node.inputs[1].is_constant


class _Converter:
    def __init__(self, graph: Graph, dtype: str):
        self.graph, self.low = graph, dtypes.from_name(dtype)
        self.casts: dict[tuple[int, str], Value] = {}     # (value, dtype) -> its Cast, shared by every reader
        self.consts: dict[int, Value] = {}                # f32 constant -> its 16-bit copy
        self.counts: collections.Counter = collections.Counter()

    def is_low(self, v: Optional[Value]) -> bool:
        return v is not None and isinstance(v.type, TensorType) and v.type.dtype == self.low

    def cast(self, v: Value, to, before: Node) -> Value:
        key = (id(v), to.name)
        if key not in self.casts:
            node = self.graph.make_node("Cast", [v], attrs={"to": to.onnx}, types=[TensorType(to, v.type.shape)],
                                        name=f"{v.name}/{to.name}", before=before)
            self.casts[key] = node.outputs[0]
        return self.casts[key]

    def constant(self, v: Value) -> Value:
        if id(v) not in self.consts:
            arr = np.asarray(v.const, np.float32)
            if self.low == dtypes.F16:        # saturate finite values (a mask's f32 min) instead of overflowing
                arr = np.where(np.isfinite(arr), np.clip(arr, -F16_MAX, F16_MAX), arr)
            self.consts[id(v)] = self.graph.add_constant(f"{v.name}/{self.low.name}", arr.astype(self.low.numpy))
            self.counts["constants"] += 1
        return self.consts[id(v)]

    def node(self, node: Node) -> None:
        op = node.qualified_op
        if not (_embedding(node) or any(self.is_low(v) for v in node.inputs)):
            return
        if node.domain == "polyport" and op not in LOW_OPERANDS or op in F32_OPS or any(node.subgraphs()):
            for i, v in enumerate(node.inputs):
                if self.is_low(v):
                    node.set_input(i, self.cast(v, dtypes.F32, node))
            self.counts[f"f32: {op}"] += 1
            return
        for i in LOW_OPERANDS.get(op, range(len(node.inputs))):
            v = node.inputs[i] if i < len(node.inputs) else None
            if _f32(v):
                node.set_input(i, self.constant(v) if v.is_constant else self.cast(v, self.low, node))
        for out in node.outputs:
            if _f32(out):
                out.type = TensorType(self.low, out.type.shape)
        if op == "Cast" and self.is_low(node.outputs[0]):
            node.attrs["to"] = self.low.onnx
        self.counts[op] += 1

    def enter(self) -> None:
        """Float graph inputs enter as 16-bit."""
        g = self.graph
        first = g.nodes[0] if g.nodes else None
        for x in g.inputs:
            if _f32(x) and x.uses and first is not None:
                users = list(x.uses)
                y = self.cast(x, self.low, first)
                for node, i in users:
                    node.set_input(i, y)

    def leave(self) -> None:
        """16-bit graph outputs leave as f32, under their own names."""
        g = self.graph
        outs = []
        for v in g.outputs:
            if self.is_low(v):
                y = g.make_node("Cast", [v], attrs={"to": dtypes.F32.onnx}, types=[TensorType(dtypes.F32, v.type.shape)],
                                name=f"{v.name}/f32").outputs[0]
                y.name, v.name = v.name, g.unique_name(f"{v.name}/{self.low.name}")
                v = y
            outs.append(v)
        g.set_outputs(outs)


def set_compute_dtype(graph: Graph, dtype: str) -> dict:
    """Make `graph` compute its activations in `dtype` (bf16 | f16), in place; returns the manifest's `compute`
    entry (the dtype, the nodes in 16-bit and those kept f32, counted by op)."""
    if dtype not in FLOAT16:
        raise PolyportError(f"compute dtype {dtype}: takes {', '.join(FLOAT16)}")
    cv = _Converter(graph, dtype)
    cv.enter()
    for node in list(graph.nodes):
        cv.node(node)
    cv.leave()
    graph.remove_unused()
    verify(graph)
    if not any(k != "constants" for k in cv.counts):
        raise PolyportError(f"--dtype {dtype}: the model has no float activations to compute in {dtype} (no "
                            "embedding lookup or float input)")
    return {"dtype": dtype, "accumulation": "f32", "tolerance": tolerance(cv.low),   # x max|logit|, vs f32
            "nodes": {k: n for k, n in sorted(cv.counts.items()) if not k.startswith("f32: ") and k != "constants"},
            "kept_f32": {k[5:]: n for k, n in sorted(cv.counts.items()) if k.startswith("f32: ")},
            "constants": cv.counts["constants"]}

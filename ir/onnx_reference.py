"""NumPy reference implementations of standard ONNX ops, from `onnx.reference`.

Each node gets a one-node ONNX model run by onnx's ReferenceEvaluator, built on
first use for the input dtypes seen and cached on the node's runner. Values a
subgraph body reads from enclosing scopes become extra inputs of that model.

Where onnx.reference deviates from the ONNX specification on inputs real exports
produce, polyport implements the op itself (`SPEC_IMPLEMENTATIONS`), checked
against ONNX Runtime in tests/test_reference_executor.py.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from . import dtypes
from .graph import Graph, Node, Value
from .types import OptionalType, SequenceType, Type


def runtime_type(x: Any, declared: Type | None = None) -> onnx.TypeProto:
    """The ONNX type of a run-time value (shape left out)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return helper.make_tensor_type_proto(dtypes.from_numpy(np.asarray(x).dtype).onnx, None)
    if isinstance(x, list):
        if x:
            return helper.make_sequence_type_proto(runtime_type(x[0]))
        from .onnx_proto import type_to_proto
        if isinstance(declared, SequenceType):
            return type_to_proto(declared, with_shape=False)
        return helper.make_sequence_type_proto(helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None))
    if x is None:
        from .onnx_proto import type_to_proto
        if isinstance(declared, OptionalType):
            return type_to_proto(declared, with_shape=False)
        return helper.make_optional_type_proto(helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None))
    raise TypeError(f"unsupported run-time value {type(x).__name__}")


def captured_values(node: Node) -> list[Value]:
    """Values that `node`'s subgraphs read from scopes outside them."""
    found: dict[int, Value] = {}
    for sub in node.subgraphs():
        _collect_captures(sub, found)
    return list(found.values())


def _collect_captures(g: Graph, found: dict[int, Value]) -> None:
    # Constants of enclosing graphs are captured too: an exported body carries only its own
    # constants as initializers, so an outer one (a weight, a folded value) must be fed in.
    # So are outer values a body returns as they are (`then_branch` returning an outer `x`).
    local = {id(v) for v in g.inputs} | {id(v) for v in g.constants.values()}
    for n in g.nodes:
        local.update(id(o) for o in n.outputs)
    for v in [v for n in g.nodes for v in n.inputs] + list(g.outputs):
        if v is not None and id(v) not in local:
            found.setdefault(id(v), v)
    for n in g.nodes:
        for sub in n.subgraphs():
            inner: dict[int, Value] = {}
            _collect_captures(sub, inner)
            for k, v in inner.items():
                if k not in local:
                    found.setdefault(k, v)


class StandardOpRunner:
    """Runs one standard-op node through onnx.reference, caching evaluators per input dtypes."""

    def __init__(self, node: Node, opsets: dict[str, int]):
        self.node = node
        self.opsets = dict(opsets)
        self.captures = captured_values(node) if any(True for _ in node.subgraphs()) else []
        self._cache: dict[tuple, ReferenceEvaluator] = {}

    def __call__(self, inputs: Sequence[Any], captured: Sequence[Any] = ()) -> list[Any]:
        own = SPEC_IMPLEMENTATIONS.get(self.node.op_type) if self.node.domain in ("", "ai.onnx") else None
        if own is not None:
            return own(self.node.attrs, *inputs)
        key = tuple(_type_key(x) for x in inputs) + tuple(_type_key(x) for x in captured)
        ev = self._cache.get(key)
        if ev is None:
            ev = self._cache[key] = self._build(inputs, captured)
        feeds = {f"in{i}": x for i, x in enumerate(inputs) if self.node.inputs[i] is not None}
        feeds.update({v.name: x for v, x in zip(self.captures, captured)})
        return list(ev.run(None, feeds))

    def _build(self, inputs, captured) -> ReferenceEvaluator:
        from .onnx_export import export_subgraph
        from .onnx_proto import node_to_proto
        names = [f"in{i}" if v is not None else "" for i, v in enumerate(self.node.inputs)]
        outs = [f"out{i}" for i in range(len(self.node.outputs))]
        proto = node_to_proto(self.node, names, outs, self.opsets, export_subgraph)
        g_inputs = [helper.make_value_info(f"in{i}", runtime_type(x, v.type))
                    for i, (x, v) in enumerate(zip(inputs, self.node.inputs)) if v is not None]
        g_inputs += [helper.make_value_info(v.name, runtime_type(x, v.type)) for v, x in zip(self.captures, captured)]
        g_outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
        graph = helper.make_graph([proto], "node", g_inputs, g_outputs)
        opset_imports = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opset_imports, ir_version=10)
        return ReferenceEvaluator(model)


def _type_key(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.dtype.str
    if isinstance(x, list):
        return ("seq", _type_key(x[0]) if x else None)
    return type(x).__name__


def gather_elements(data: np.ndarray, indices: np.ndarray, axis: int = 0) -> np.ndarray:
    """GatherElements as specified: out[i..] = data[i.. with i[axis] = indices[i..]], out.shape = indices.shape.

    Along the other axes the indices may be shorter than the data (a top-k over a slice of
    the experts' scores, exported by dynamo). onnx.reference and np.take_along_axis both
    reject that; ONNX Runtime runs it."""
    axis = axis % data.ndim
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    return data[tuple(grid)]


# op_type -> fn(attrs, *inputs) -> outputs, for the ops onnx.reference gets wrong.
SPEC_IMPLEMENTATIONS: dict[str, Any] = {
    "GatherElements": lambda attrs, data, indices: [gather_elements(data, indices, attrs.get("axis", 0))],
}

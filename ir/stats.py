"""A graph's vital statistics: signature, op histogram, parameter count, opsets.

`graph_stats(graph)` returns plain JSON-ready data (`polyport inspect --json`
prints it as is). Shapes are lists whose dims are ints, strings for symbolic
dims (`"seq"`, `"seq + 1"`) and None where a dim is unknown; a shape is None
where even the rank is unknown.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Optional

import numpy as np

from . import dtypes
from .graph import Graph, Value
from .types import TensorType, Type, format_dim

STANDARD_DOMAIN_NAME = "ai.onnx"  # how the default domain ("") is spelled in the stats


def graph_stats(graph: Graph) -> dict[str, Any]:
    """Statistics of `graph` and (for ops, nodes and constants) all its subgraphs.

    Keys: name, inputs, outputs ([{name, dtype, shape}]), symbols (the symbolic
    dims the inputs define, sorted), nodes (count), ops ({op: count}, most
    frequent first; ops outside the default domain as `domain::Op`),
    parameters (elements of float constants: the weights), parameter_bytes
    (bytes of all constants), opsets ({domain: version}), metadata.
    """
    ops = Counter(node.qualified_op for node in graph.walk())
    constants = list(_all_constants(graph))
    return {
        "name": graph.name,
        "inputs": [value_summary(v) for v in graph.inputs],
        "outputs": [value_summary(v) for v in graph.outputs],
        "symbols": sorted({s for v in graph.inputs if isinstance(v.type, TensorType) for s in v.type.symbols}),
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": sum(int(v.const.size) for v in constants if _is_float(v.const)),
        "parameter_bytes": sum(array_bytes(v.const) for v in constants),
        "opsets": {(d or STANDARD_DOMAIN_NAME): int(ver) for d, ver in sorted(graph.opset_imports.items())},
        "metadata": dict(graph.metadata),
    }


def value_summary(v: Value) -> dict[str, Any]:
    """{name, dtype, shape} of a value, JSON-ready (see the module docstring)."""
    return {"name": v.name, **type_summary(v.type)}


def type_summary(t: Type) -> dict[str, Any]:
    if isinstance(t, TensorType):
        dtype = str(t.dtype) if t.dtype is not None else None
        shape = None if t.shape is None else [_dim(d) for d in t.shape]
        return {"dtype": dtype, "shape": shape}
    return {"dtype": str(t), "shape": None}   # sequences, optionals, opaque types


def array_bytes(a: np.ndarray) -> int:
    """Storage size of a constant: packed for sub-byte types, UTF-8 length for strings."""
    try:
        dt = dtypes.from_numpy(a.dtype)
    except dtypes.UnknownDType:
        return int(a.nbytes)
    if dt.name == "str":
        return sum(len(x.encode() if isinstance(x, str) else bytes(x)) for x in a.reshape(-1))
    return (int(a.size) * dt.itemsize_bits + 7) // 8


def _dim(d) -> Optional[int | str]:
    return d if isinstance(d, int) or d is None else format_dim(d)


def _is_float(a: np.ndarray) -> bool:
    try:
        return dtypes.from_numpy(a.dtype).is_float
    except dtypes.UnknownDType:
        return False


def _all_constants(graph: Graph) -> Iterator[Value]:
    yield from graph.constants.values()
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from _all_constants(sub)

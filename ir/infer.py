"""Type inference for one node: the registered function, else ONNX's own."""
from __future__ import annotations

import onnx
from onnx import helper

from .graph import Node
from .ops import InferContext, known_value, lookup
from .symbolic import SymExpr
from .types import TensorType, Type, UNKNOWN


def infer_node(node: Node, opsets: dict[str, int]) -> list[Type]:
    ctx = InferContext(opset=opsets.get(node.domain, 0))
    d = lookup(node.domain, node.op_type)
    if d is not None and d.infer is not None:
        return list(d.infer(node, ctx))
    return _onnx_infer(node, opsets)


def _onnx_infer(node: Node, opsets: dict[str, int]) -> list[Type]:
    from .onnx_proto import node_to_proto, tensor_from_array, type_from_proto, type_to_proto
    unknown = [UNKNOWN] * len(node.outputs)
    if node.domain not in ("",) or any(True for _ in node.subgraphs()):
        return unknown
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get("", 1), "")
    except onnx.defs.SchemaError:
        return unknown
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    types, data = {}, {}
    for name, v in zip(names, node.inputs):
        if v is None:
            continue
        types[name] = type_to_proto(v.type)
        value = known_value(v)
        if value is not None and value.dtype != object and value.size <= 4096:
            data[name] = tensor_from_array(value, name)
    try:
        proto = node_to_proto(node, names, outs, opsets)
        result = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, data, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    except Exception:  # noqa: BLE001 - ONNX inference is a best-effort fallback; the executor checks at run time
        return unknown
    return [type_from_proto(result[o]) if o in result else UNKNOWN for o in outs]


def merge_types(inferred: Type, declared: Type | None, known_symbols: frozenset[str]) -> Type:
    """Prefer what inference proved; fill its gaps from the file's annotations.

    An annotated dim is used only where it is an int or is built from symbols
    the graph's inputs define (exporters annotate with private names like `s72`)."""
    if declared is None or not isinstance(declared, TensorType) or not isinstance(inferred, TensorType):
        return inferred if inferred is not UNKNOWN or declared is None else declared
    dtype = inferred.dtype or declared.dtype
    if inferred.shape is None:
        shape = None if declared.shape is None else tuple(_usable(d, known_symbols) for d in declared.shape)
    elif declared.shape is None or len(declared.shape) != len(inferred.shape):
        shape = inferred.shape
    else:
        shape = tuple(i if i is not None else _usable(d, known_symbols) for i, d in zip(inferred.shape, declared.shape))
    return TensorType(dtype, shape)


def _usable(d, known_symbols):
    if isinstance(d, SymExpr):
        return d if d.symbols <= known_symbols else None
    return d

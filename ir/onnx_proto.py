"""Conversions between IR objects and ONNX protobuf messages.

Kept out of the IR core (graph.py knows nothing of protobuf); the frontend,
the exporter, ONNX-inference fallback and the reference executor use these.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, TypeProto, helper, numpy_helper

from . import dtypes
from .symbolic import SymExpr, parse, sym
from .types import OpaqueType, OptionalType, SequenceType, TensorType, Type, UNKNOWN


# ---- types ---------------------------------------------------------------------------
def dim_from_proto(d: onnx.TensorShapeProto.Dimension):
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        try:
            return parse(d.dim_param)
        except ValueError:
            return sym(symbol_name(d.dim_param))
    return None


def symbol_name(text: str) -> str:
    """An identifier for an arbitrary dim_param (`batch size` -> `batch_size`)."""
    name = re.sub(r"\W", "_", text)
    return name if re.match(r"[A-Za-z_]", name) else f"d_{name}"


def type_from_proto(tp: TypeProto) -> Type:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        tt = tp.tensor_type
        dt = dtypes.from_onnx(tt.elem_type) if tt.elem_type else None
        shape = tuple(dim_from_proto(d) for d in tt.shape.dim) if tt.HasField("shape") else None
        return TensorType(dt, shape)
    if kind == "sequence_type":
        return SequenceType(type_from_proto(tp.sequence_type.elem_type))
    if kind == "optional_type":
        return OptionalType(type_from_proto(tp.optional_type.elem_type))
    if kind is None:
        return UNKNOWN
    return OpaqueType(kind)


def type_to_proto(t: Type, with_shape: bool = True) -> TypeProto:
    if isinstance(t, TensorType):
        elem = t.dtype.onnx if t.dtype is not None else TensorProto.UNDEFINED
        if t.shape is None or not with_shape:
            return helper.make_tensor_type_proto(elem, None)
        dims = [d if isinstance(d, int) else (str(d) if d is not None else None) for d in t.shape]
        return helper.make_tensor_type_proto(elem, dims)
    if isinstance(t, SequenceType):
        return helper.make_sequence_type_proto(type_to_proto(t.elem, with_shape))
    if isinstance(t, OptionalType):
        return helper.make_optional_type_proto(type_to_proto(t.elem, with_shape))
    return TypeProto()


# ---- tensors -------------------------------------------------------------------------
def array_from_tensor(t: TensorProto, base_dir: Optional[str] = None) -> np.ndarray:
    """A NumPy view of a TensorProto; external data is memory-mapped, not read."""
    if t.data_location == TensorProto.EXTERNAL:
        from .external_data import mmap_external
        return mmap_external(t, base_dir)
    return numpy_helper.to_array(t)


def tensor_from_array(arr: np.ndarray, name: str = "") -> TensorProto:
    arr = np.asarray(arr)
    if arr.dtype == object and arr.size and isinstance(arr.flat[0], (str, bytes)):
        return numpy_helper.from_array(arr, name)
    return numpy_helper.from_array(arr, name)


# ---- attributes ----------------------------------------------------------------------
GraphFromProto = Callable[[onnx.GraphProto], Any]


def attr_from_proto(a: AttributeProto, import_graph: GraphFromProto, base_dir: Optional[str] = None) -> Any:
    T = AttributeProto
    if a.type == T.FLOAT:
        return float(a.f)
    if a.type == T.INT:
        return int(a.i)
    if a.type == T.STRING:
        return _decode(a.s)
    if a.type == T.TENSOR:
        return array_from_tensor(a.t, base_dir)
    if a.type == T.GRAPH:
        return import_graph(a.g)
    if a.type == T.FLOATS:
        return [float(x) for x in a.floats]
    if a.type == T.INTS:
        return [int(x) for x in a.ints]
    if a.type == T.STRINGS:
        return [_decode(x) for x in a.strings]
    if a.type == T.TENSORS:
        return [array_from_tensor(t, base_dir) for t in a.tensors]
    if a.type == T.GRAPHS:
        return [import_graph(g) for g in a.graphs]
    # Sparse tensors and type protos are carried as protos.
    return RawAttr(a)


class RawAttr:
    """An attribute polyport carries through unchanged (sparse tensors, type protos)."""

    def __init__(self, proto: AttributeProto):
        self.proto = proto

    def __repr__(self):
        return f"<{AttributeProto.AttributeType.Name(self.proto.type)}>"


def _decode(b: bytes):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def attr_to_proto(name: str, value: Any, export_graph: Callable[[Any], onnx.GraphProto],
                  attr_type: Optional[int] = None) -> AttributeProto:
    from .graph import Graph
    if isinstance(value, RawAttr):
        a = AttributeProto()
        a.CopyFrom(value.proto)
        a.name = name
        return a
    if isinstance(value, Graph):
        return helper.make_attribute(name, export_graph(value))
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, tensor_from_array(value))
    if isinstance(value, list) and value and isinstance(value[0], Graph):
        return helper.make_attribute(name, [export_graph(g) for g in value])
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return helper.make_attribute(name, [tensor_from_array(v) for v in value])
    if isinstance(value, list) and value and isinstance(value[0], SymExpr | int):
        value = [str(v) for v in value] if any(isinstance(v, SymExpr) for v in value) else value
    if isinstance(value, list) and not value:
        return helper.make_attribute(name, value, attr_type=attr_type or AttributeProto.INTS)
    return helper.make_attribute(name, value, attr_type=attr_type)


def schema_attr_types(op_type: str, domain: str, opset: int) -> dict[str, int]:
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return {}
    return {n: int(a.type) for n, a in schema.attributes.items()}


# ---- nodes ---------------------------------------------------------------------------
def node_to_proto(node, input_names, output_names, opsets: dict[str, int], export_graph=None) -> onnx.NodeProto:
    """A NodeProto for `node` with the given value names (subgraphs written by `export_graph`:
    `onnx_export.export_subgraph`, which imports this module)."""
    types = schema_attr_types(node.op_type, node.domain, opsets.get(node.domain, 1))
    attrs = [attr_to_proto(k, v, export_graph, types.get(k)) for k, v in node.attrs.items()]
    proto = helper.make_node(node.op_type, list(input_names), list(output_names), name=node.name,
                             domain=node.domain or None)
    proto.attribute.extend(attrs)
    return proto

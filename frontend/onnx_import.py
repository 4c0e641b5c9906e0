"""ONNX -> IR.

Loads a model (external data memory-mapped), checks every op against the
opsets it declares, inlines model-local functions, infers symbolic types node
by node and folds shape arithmetic as it goes: `Shape(x) -> Gather -> Concat`
over a symbolic `seq` becomes one `polyport::ShapeValue {dims=[1, seq, 64]}`,
so the consumer's output type is known and the subgraph disappears.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import google.protobuf.message
import numpy as np
import onnx

from .. import errors
from ..ir import dtypes, shape_value  # noqa: F401 - registers polyport::ShapeValue
from ..ir import onnx_shapes  # noqa: F401 - registers symbolic inference for standard ops
from ..ir.fold import fold, materialise
from ..ir.graph import Graph, Node, Value
from ..ir.infer import infer_node, merge_types
from ..ir.onnx_proto import array_from_tensor, attr_from_proto, type_from_proto
from ..ir.ops import lookup
from ..ir.types import TensorType
from . import fused_import, quant_import  # noqa: F401 - quant_import registers MatMulNBits

MAX_OPSET = onnx.defs.onnx_opset_version()
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training")


def load_model_proto(path: str) -> onnx.ModelProto:
    """Read an ONNX file without its external data, with clear errors for bad files."""
    if not os.path.exists(path):
        raise errors.ImportError_(f"{path}: no such file")
    if os.path.isdir(path):
        raise errors.ImportError_(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError) as e:
        raise errors.ImportError_(f"{path}: not a readable ONNX model (truncated or not ONNX: {e})") from e
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.output:
        raise errors.ImportError_(f"{path}: not an ONNX model (no IR version or graph outputs)")
    bad = _undecodable_text(model)
    if bad:
        raise errors.ImportError_(f"{path}: corrupted: {bad} is not valid UTF-8 text")
    return model


def _undecodable_text(msg) -> Optional[str]:
    """The first string field (a name, op type, domain) that protobuf handed back as raw bytes, or None."""
    for field, value in msg.ListFields():
        if field.type == field.TYPE_STRING:
            if any(not isinstance(v, str) for v in (value if field.is_repeated else [value])):
                return f"a {msg.DESCRIPTOR.name}.{field.name}"
        elif field.type == field.TYPE_MESSAGE:
            for sub in (value if field.is_repeated else [value]):
                found = _undecodable_text(sub)
                if found:
                    return found
    return None


def import_onnx(model: Union[str, os.PathLike, onnx.ModelProto], *, fold_shapes: bool = True,
                base_dir: Optional[str] = None) -> Graph:
    """Import an ONNX model (a path or a ModelProto) into a polyport Graph."""
    source = "<model>"
    if not isinstance(model, onnx.ModelProto):
        source = os.fspath(model)
        base_dir = base_dir or os.path.dirname(os.path.abspath(source))
        model = load_model_proto(source)
    opsets = _check_opsets(model, source)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    importer = _Importer(opsets, base_dir, source, fold_shapes)
    graph = importer.import_graph(model.graph, parent=None, outer={})
    graph.opset_imports.update(opsets)
    graph.metadata.update({p.key: p.value for p in model.metadata_props})
    graph.metadata["ir_version"] = str(model.ir_version)
    if model.producer_name:
        graph.metadata["producer"] = f"{model.producer_name} {model.producer_version}".strip()
    graph.remove_unused()
    return graph


def _check_opsets(model: onnx.ModelProto, source: str) -> dict[str, int]:
    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}
    if "" in opsets and opsets[""] > MAX_OPSET:
        raise errors.UnsupportedOpError(
            f"{source}: opset {opsets['']} of domain 'ai.onnx' is newer than the newest supported ({MAX_OPSET})")
    return opsets


def _is_standard_op(np_: onnx.NodeProto, opsets: dict[str, int]) -> bool:
    domain = "" if np_.domain == "ai.onnx" else np_.domain
    try:
        onnx.defs.get_schema(np_.op_type, opsets.get(domain, 1), domain)
        return True
    except onnx.defs.SchemaError:
        return False


# What shape inference and folding raise on inputs a valid model cannot have (an axis out of range, a
# scalar that is empty, an attribute value of the wrong kind): the model is malformed, said in one line.
_MALFORMED = (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError)


class _Importer:
    def __init__(self, opsets: dict[str, int], base_dir: Optional[str], source: str, fold_shapes: bool):
        self.opsets = opsets
        self.base_dir = base_dir
        self.source = source
        self.fold_shapes = fold_shapes
        self.bindable: frozenset[str] = frozenset()

    def import_graph(self, gp: onnx.GraphProto, parent: Optional[Graph], outer: dict[str, Value]) -> Graph:
        g = Graph(gp.name or "main", parent)
        scope: dict[str, Value] = dict(outer)
        declared = {}
        for vi in list(gp.value_info) + list(gp.output):
            try:
                declared[vi.name] = type_from_proto(vi.type)
            except dtypes.UnknownDType as e:
                raise errors.ImportError_(f"{self.source}: value {vi.name!r}: {e}") from None
        init_names = {t.name for t in gp.initializer} | {t.values.name for t in gp.sparse_initializer}
        for t in gp.initializer:
            try:
                arr = array_from_tensor(t, self.base_dir)
            except dtypes.UnknownDType as e:
                raise errors.ImportError_(f"{self.source}: initializer {t.name!r}: {e}") from None
            except (ValueError, TypeError, KeyError) as e:      # onnx's decoder: bad dims, data size or dtype
                raise errors.ImportError_(f"{self.source}: initializer {t.name!r} (dtype {t.data_type}, dims "
                                          f"{list(t.dims)}) cannot be decoded: {type(e).__name__}: {e}") from None
            scope[t.name] = self._constant(g, t.name, arr)
        for t in gp.sparse_initializer:
            dense = onnx.numpy_helper.to_array(onnx.helper.make_tensor(
                t.values.name, t.values.data_type, list(t.dims), np.zeros(int(np.prod(t.dims)))))
            dense = dense.copy()
            idx = onnx.numpy_helper.to_array(t.indices)
            vals = onnx.numpy_helper.to_array(t.values)
            if idx.ndim == 1:
                dense.reshape(-1)[idx] = vals
            else:
                dense[tuple(idx.T)] = vals
            scope[t.values.name] = self._constant(g, t.values.name, dense)
        for vi in gp.input:
            if vi.name in init_names:
                continue  # an initializer listed as an input (IR < 4): a constant with a default
            try:
                v = Value(vi.name, type_from_proto(vi.type))
            except dtypes.UnknownDType as e:
                raise errors.ImportError_(f"{self.source}: input {vi.name!r}: {e}") from None
            g._names.add(vi.name)
            g.inputs.append(v)
            scope[vi.name] = v
        if parent is None:
            self.bindable = frozenset(s for v in g.inputs if isinstance(v.type, TensorType) for s in v.type.symbols)
        for np_ in gp.node:
            again = [n for n in np_.output if n and n in scope and n not in outer]
            if again:       # ONNX graphs are in SSA form: a second producer would silently replace the first
                raise errors.ImportError_(f"{self.source}: node {np_.name or '?'} ({np_.op_type}): output "
                                          f"{again[0]!r} is already defined in the graph (a value has one producer)")
            self._import_node(g, np_, scope, declared, fold_here=self.fold_shapes and parent is None)
        outputs = []
        for vi in gp.output:
            if vi.name not in scope:
                raise errors.ImportError_(f"{self.source}: graph output {vi.name!r} is produced by no node")
            outputs.append(scope[vi.name])
        g.set_outputs(outputs)
        return g

    def _constant(self, g: Graph, name: str, arr: np.ndarray) -> Value:
        try:
            t = TensorType(dtypes.from_numpy(arr.dtype), arr.shape)
        except dtypes.UnknownDType as e:
            raise errors.ImportError_(f"{self.source}: constant {name!r}: {e}") from None
        v = Value(name, t, const=arr)
        g._names.add(name)
        g.constants[name] = v
        return v

    def _import_node(self, g: Graph, np_: onnx.NodeProto, scope: dict[str, Value], declared, fold_here: bool):
        where = f"{self.source}: node {np_.name or '?'} ({np_.op_type})"
        self._check_op(np_, where)
        if np_.op_type == "Constant" and np_.domain in ("", "ai.onnx"):
            scope[np_.output[0]] = self._constant(g, np_.output[0], self._constant_value(np_, where))
            return
        inputs = []
        for name in np_.input:
            if not name:
                inputs.append(None)
            elif name in scope:
                inputs.append(scope[name])
            else:
                raise errors.ImportError_(f"{where}: input {name!r} is not defined before the node")
        attrs = {a.name: attr_from_proto(a, lambda sub: self.import_graph(sub, g, scope), self.base_dir)
                 for a in np_.attribute}
        outs = []
        for name in np_.output:
            v = Value(name or g.unique_name("unused"))
            g._names.add(v.name)
            outs.append(v)
        convert = fused_import.converter_for(np_.domain, np_.op_type)
        if convert is not None:   # an already-fused op: becomes polyport's fused op (+ layout adapters)
            conversion = fused_import.Conversion(
                g, np_.name or np_.op_type, np_.domain, np_.op_type, inputs, attrs, outs, list(np_.output),
                source=self.source, opsets=self.opsets, declared=declared, bindable=self.bindable, fold_shapes=fold_here)
            existing = set(g.nodes)
            try:
                results = convert(conversion)
            except errors.UnsupportedOpError:
                if not _is_standard_op(np_, self.opsets):
                    raise
                # A standard op with a feature polyport's fused op lacks (Attention softcap, say):
                # keep the standard op, which the reference executor runs as ONNX defines it.
                for n in reversed(g.nodes):
                    if n not in existing:
                        g.remove(n)
            else:
                for name, v in zip(np_.output, results):
                    if name and v is not None:
                        scope[name] = v
                return
        node = Node(np_.op_type, inputs, outs, attrs, np_.domain, np_.name or g.unique_name(np_.op_type))
        g._names.add(node.name)
        opsets = {**self.opsets, node.domain: self.opsets.get(node.domain, 1)}
        try:
            types = infer_node(node, opsets)
        except errors.PolyportError as e:
            raise type(e)(f"{self.source}: {e}") from None
        except dtypes.UnknownDType as e:  # an output type polyport has no dtype for (e.g. Cast to INT2)
            raise errors.ImportError_(f"{where}: {e}") from None
        except _MALFORMED as e:
            raise errors.ImportError_(f"{where}: its inputs or attributes are malformed (type inference: "
                                      f"{type(e).__name__}: {e})") from e
        for v, t in zip(outs, types):
            v.type = merge_types(t, declared.get(v.name), self.bindable)
        for name, v in zip(np_.output, outs):
            if name:
                scope[name] = v
        g.append(node)
        try:
            folded = fold(node, opsets, self.bindable) if fold_here else None
        except _MALFORMED as e:
            raise errors.ImportError_(f"{where}: its inputs or attributes are malformed (constant folding: "
                                      f"{type(e).__name__}: {e})") from e
        if folded is not None:
            materialise(g, node, folded)

    def _constant_value(self, np_: onnx.NodeProto, where: str) -> np.ndarray:
        a = np_.attribute[0] if np_.attribute else None
        if a is None:
            raise errors.ImportError_(f"{where}: Constant has no value attribute")
        if a.name == "value":
            return array_from_tensor(a.t, self.base_dir)
        if a.name == "sparse_value":
            raise errors.UnsupportedOpError(f"{where}: sparse Constant values are not supported")
        simple = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                  "value_ints": np.int64}
        if a.name in simple:
            return np.array(onnx.helper.get_attribute_value(a), dtype=simple[a.name])
        if a.name in ("value_string", "value_strings"):
            v = onnx.helper.get_attribute_value(a)
            v = [x.decode() for x in v] if isinstance(v, list) else v.decode()
            return np.array(v, dtype=object)
        raise errors.ImportError_(f"{where}: Constant attribute {a.name!r} is not understood")

    def _check_op(self, np_: onnx.NodeProto, where: str) -> None:
        domain = "" if np_.domain == "ai.onnx" else np_.domain
        if domain in STANDARD_DOMAINS:
            version = self.opsets.get(domain)
            if version is None:
                raise errors.UnsupportedOpError(f"{where}: domain {domain or 'ai.onnx'!r} is not in the model's opset imports")
            try:
                schema = onnx.defs.get_schema(np_.op_type, version, domain)
            except onnx.defs.SchemaError:
                if not onnx.defs.has(np_.op_type, domain) and fused_import.converter_for(domain, np_.op_type):
                    return  # an ONNX Runtime op in the ai.onnx domain (SimplifiedLayerNormalization)
                raise errors.UnsupportedOpError(
                    f"{where}: unknown op {np_.op_type!r} in domain {domain or 'ai.onnx'!r} at opset {version}") from None
            n_in = len(np_.input)
            if not schema.min_input <= n_in <= schema.max_input:
                raise errors.ImportError_(f"{where}: {n_in} inputs; {np_.op_type}-{schema.since_version} takes "
                                          f"{schema.min_input} to {schema.max_input}")
            for a in np_.attribute:         # shape inference and folding read attributes as the schema types them
                declared = schema.attributes.get(a.name)
                if declared is not None and a.type != declared.type:
                    raise errors.ImportError_(
                        f"{where}: attribute {a.name!r} is {onnx.AttributeProto.AttributeType.Name(a.type)}, "
                        f"{np_.op_type}-{schema.since_version} declares it "
                        f"{onnx.AttributeProto.AttributeType.Name(declared.type)}")
            return
        if fused_import.converter_for(domain, np_.op_type) is not None:
            return  # com.microsoft fused ops import as polyport's (frontend/fused_import.py)
        d = lookup(domain, np_.op_type)
        if d is None or d.reference is None:
            raise errors.UnsupportedOpError(
                f"{where}: unsupported op {np_.op_type!r} in domain {domain!r} "
                f"(opset {self.opsets.get(domain, '?')})")

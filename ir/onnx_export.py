"""IR -> ONNX.

Standard ops map back one to one. A `polyport::ShapeValue` is re-expressed as
the shape arithmetic it stands for, reading each symbol off the graph input
that defines it (`seq` -> Shape(input_ids)[1]), so any ONNX runtime can run
the export.
"""
from __future__ import annotations

from typing import Optional

import onnx
from onnx import TensorProto, helper

from .. import errors
from .graph import Graph, Node, Value
from .onnx_proto import node_to_proto, tensor_from_array, type_to_proto
from .ops import POLYPORT_DOMAIN
from .symbolic import Atom, SymExpr
from .types import TensorType

DEFAULT_IR_VERSION = 10


def export_onnx(graph: Graph, *, ir_version: Optional[int] = None) -> onnx.ModelProto:
    """Export a graph to an ONNX ModelProto (weights inline)."""
    exporter = _Exporter(graph)
    gp = exporter.graph_proto(graph)
    opsets = {d: v for d, v in graph.opset_imports.items() if d != POLYPORT_DOMAIN}
    opsets.setdefault("", 18)
    model = helper.make_model(gp, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="polyport")
    # The oldest IR version the opsets allow (at least 10, for 4-bit and fp8 types): what runtimes accept.
    model.ir_version = ir_version or max(DEFAULT_IR_VERSION, helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def export_subgraph(graph: Graph) -> onnx.GraphProto:
    """A subgraph body (If/Loop/Scan) as a GraphProto; captured values keep their names."""
    return _Exporter(graph.root()).graph_proto(graph)


class _Exporter:
    def __init__(self, root: Graph):
        self.root = root

    def graph_proto(self, g: Graph) -> onnx.GraphProto:
        nodes: list[onnx.NodeProto] = []
        initializers = [tensor_from_array(v.const, v.name) for v in g.constants.values()]
        shape_values = ShapeValueWriter(self.root)
        for node in g.nodes:
            if node.domain == POLYPORT_DOMAIN and node.op_type == "ShapeValue":
                nodes.extend(shape_values.protos(node, initializers))
                continue
            names = [v.name if v is not None else "" for v in node.inputs]
            nodes.append(node_to_proto(node, names, [v.name for v in node.outputs], g.opset_imports,
                                       export_graph=self.graph_proto))
        value_info = [helper.make_value_info(o.name, type_to_proto(o.type))
                      for n in g.nodes for o in n.outputs if _annotated(o)]
        return helper.make_graph(
            nodes, g.name,
            [helper.make_value_info(v.name, type_to_proto(v.type)) for v in g.inputs],
            [helper.make_value_info(v.name, type_to_proto(v.type)) for v in g.outputs],
            initializers, value_info=value_info)


class ShapeValueWriter:
    """Writes `polyport::ShapeValue` nodes as ONNX shape arithmetic, reading each symbol off the graph input
    that defines it. One per emitted graph: it emits each symbol's Shape node once and reuses it."""

    def __init__(self, root: Graph):
        self._symbol_sources = _symbol_sources(root)
        self._cache: dict[str, str] = {}

    def protos(self, node: Node, inits: list) -> list[onnx.NodeProto]:
        """The NodeProtos computing `node`'s output (its constants appended to `inits`)."""
        sym_cache = self._cache
        out = node.outputs[0].name
        dims = node.attrs["dims"]
        protos: list[onnx.NodeProto] = []

        def const(name_hint: str, values) -> str:
            name = f"{out}__{name_hint}"
            inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
            return name

        def symbol(s: str) -> str:
            if s not in sym_cache:
                src = self._symbol_sources.get(s)
                if src is None:
                    raise errors.PolyportError(f"cannot export {node.name}: no graph input defines symbol {s!r}")
                value, axis = src
                name = f"{out}__{s}"
                protos.append(helper.make_node("Shape", [value.name], [name], start=axis, end=axis + 1))
                sym_cache[s] = name
            return sym_cache[s]

        def fresh(hint: str) -> str:
            return f"{out}__{hint}{len(protos)}_{len(inits)}"

        def emit(op: str, inputs: list[str]) -> str:
            name = fresh(op.lower())
            protos.append(helper.make_node(op, inputs, [name]))
            return name

        def atom(a: Atom) -> str:
            x, y = expr(a.args[0]), expr(a.args[1])
            if a.kind == "floordiv":  # ONNX Div truncates; x - (x mod k) is a multiple of k
                return emit("Div", [emit("Sub", [x, emit("Mod", [x, y])]), y])
            return emit("Min" if a.kind == "min" else "Max", [x, y])

        def expr(d) -> str:
            if isinstance(d, int):
                return const(f"c{len(protos)}_{len(inits)}", [d])
            terms = []
            for mono, coeff in sorted(d.terms.items(), key=lambda t: str(t[0])):
                acc = const(f"k{len(protos)}_{len(inits)}", [coeff])
                for f in mono:
                    acc = emit("Mul", [acc, atom(f) if isinstance(f, Atom) else symbol(f)])
                terms.append(acc)
            total = terms[0]
            for t in terms[1:]:
                total = emit("Add", [total, t])
            return total

        parts = [expr(d) for d in dims]
        if node.attrs.get("scalar"):
            protos.append(helper.make_node("Squeeze", [parts[0]], [out]))
        else:
            protos.append(helper.make_node("Concat", parts, [out], axis=0))
        return protos


def _annotated(v: Value) -> bool:
    return isinstance(v.type, TensorType) and v.type.dtype is not None


def _symbol_sources(g: Graph) -> dict[str, tuple[Value, int]]:
    sources: dict[str, tuple[Value, int]] = {}
    for v in g.inputs:
        if isinstance(v.type, TensorType) and v.type.shape is not None:
            for axis, d in enumerate(v.type.shape):
                if isinstance(d, SymExpr) and len(d.terms) == 1:
                    (mono, coeff), = d.terms.items()
                    if coeff == 1 and len(mono) == 1:
                        sources.setdefault(mono[0], (v, axis))
    return sources

"""The IR's text form: one line per node, types included. Tests compare graphs through it."""
from __future__ import annotations

import numpy as np

from .graph import Graph, Node, Value

_MAX_INLINE = 8  # constants up to this many elements print their values


def format_graph(graph: Graph, indent: str = "") -> str:
    lines = []
    ins = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    lines.append(f"{indent}graph {graph.name}({ins}) {{")
    for v in graph.constants.values():
        lines.append(f"{indent}  %{v.name}: {v.type} = {_const_text(v)}")
    for node in graph.nodes:
        lines.extend(format_node(node, indent + "  "))
    outs = ", ".join(f"%{v.name}" for v in graph.outputs)
    lines.append(f"{indent}  return {outs}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def format_node(node: Node, indent: str = "") -> list[str]:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    ins = ", ".join("%" + v.name if v is not None else "_" for v in node.inputs)
    attrs = {k: v for k, v in node.attrs.items() if not _is_graph(v)}
    attr_text = (" {" + ", ".join(f"{k}={_attr_text(v)}" for k, v in sorted(attrs.items())) + "}") if attrs else ""
    lines = [f"{indent}{outs} = {node.qualified_op}({ins}){attr_text}"]
    for k, v in sorted(node.attrs.items()):
        for sub in (v if isinstance(v, list) else [v]):
            if isinstance(sub, Graph):
                lines.append(f"{indent}  {k}:")
                lines.append(format_graph(sub, indent + "    "))
    return lines


def _is_graph(v) -> bool:
    return isinstance(v, Graph) or (isinstance(v, list) and bool(v) and isinstance(v[0], Graph))


def _attr_text(v) -> str:
    if isinstance(v, np.ndarray):
        return _array_text(v)
    if isinstance(v, list):
        return "[" + ", ".join(_attr_text(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v)
    return str(v)


def _const_text(v: Value) -> str:
    return _array_text(v.const)


def _array_text(a: np.ndarray) -> str:
    if a.size <= _MAX_INLINE and a.dtype != object:
        return f"const {np.array2string(a.reshape(-1), separator=', ')}"
    return "const <...>"


def format_value(v: Value) -> str:
    return f"%{v.name}: {v.type}"

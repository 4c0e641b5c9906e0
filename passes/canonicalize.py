"""Canonicalisation: fold what is known, drop no-op shape ops, merge duplicates, remove dead code.

Fusions run after this, so their patterns see one spelling of each idiom:
no Identity, no Cast to the same type, no Reshape/Expand to the shape a value
already has, no identity Transpose, a Transpose of a Transpose merged.
"""
from __future__ import annotations

import numpy as np

from ..ir.fold import fold, materialise
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from .manager import PassResult, register_pass


def _bindable(graph: Graph) -> frozenset[str]:
    return frozenset(s for v in graph.inputs if isinstance(v.type, TensorType) for s in v.type.symbols)


@register_pass("fold-constants")
def fold_constants(graph: Graph) -> PassResult:
    """Evaluate nodes whose inputs are known (constants and symbolic shapes)."""
    result = PassResult()
    bindable = _bindable(graph)
    for node in graph.nodes:
        values = fold(node, graph.opset_imports, bindable)
        if values is not None:
            materialise(graph, node, values)
            result.count("folded")
    return result


def _same_type(a: Value, b: Value) -> bool:
    ta, tb = a.type, b.type
    return (isinstance(ta, TensorType) and isinstance(tb, TensorType) and ta.dtype is not None
            and ta.dtype == tb.dtype and ta.shape is not None and ta.shape == tb.shape
            and all(d is not None for d in ta.shape))


def _noop(node: Node) -> bool:
    """Is the node's only output equal to its first input?"""
    if node.domain or len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
        return False
    x, y = node.inputs[0], node.outputs[0]
    op = node.op_type
    if op == "Identity":
        return True
    if op in ("Cast", "Reshape", "Expand", "Squeeze", "Unsqueeze", "Flatten", "CastLike"):
        return _same_type(x, y)
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    return False


@register_pass("simplify")
def simplify(graph: Graph) -> PassResult:
    """Forward no-op shape ops; merge Transpose pairs."""
    result = PassResult()
    for node in graph.nodes:
        if node.graph is not graph:
            continue
        if _noop(node):
            y = node.outputs[0]
            if y.is_graph_output:
                continue   # keep the output's name
            y.replace_all_uses_with(node.inputs[0])
            graph.remove(node)
            result.count(f"removed {node.op_type}")
        elif node.op_type == "Transpose" and not node.domain:
            inner = node.inputs[0].producer
            if inner is not None and inner.op_type == "Transpose" and not inner.domain \
                    and "perm" in inner.attrs and "perm" in node.attrs:
                p_in, p_out = inner.attrs["perm"], node.attrs["perm"]
                node.attrs["perm"] = [p_in[i] for i in p_out]
                node.set_input(0, inner.inputs[0])
                result.count("merged Transpose")
    graph.remove_unused()
    return result


def _cse_key(node: Node, ids: dict[int, int]):
    if any(True for _ in node.subgraphs()) or node.op_type.startswith("Random"):
        return None
    attrs = []
    for k, v in sorted(node.attrs.items()):
        if isinstance(v, np.ndarray):
            v = (v.dtype.str, v.shape, v.tobytes())
        elif isinstance(v, list):
            v = tuple(str(x) for x in v)
        attrs.append((k, v))
    return (node.domain, node.op_type, tuple(ids.get(id(v), id(v)) if v is not None else None
                                             for v in node.inputs), tuple(attrs), len(node.outputs))


@register_pass("cse")
def cse(graph: Graph) -> PassResult:
    """Merge identical small constants and identical nodes over the same inputs."""
    result = PassResult()
    canon: dict[int, int] = {}        # id(value) -> id(representative)
    by_bytes: dict[tuple, Value] = {}
    for v in list(graph.constants.values()):
        if v.const.size <= 1024 and v.const.dtype != object and not v.is_graph_output:
            key = (v.const.dtype.str, v.const.shape, v.const.tobytes())
            rep = by_bytes.setdefault(key, v)
            if rep is not v:
                v.replace_all_uses_with(rep)
                result.count("merged constant")
    seen: dict[tuple, Node] = {}
    for node in graph.nodes:
        key = _cse_key(node, canon)
        if key is None:
            continue
        rep = seen.setdefault(key, node)
        if rep is node:
            continue
        if any(o.is_graph_output for o in node.outputs):
            continue
        for old, new in zip(node.outputs, rep.outputs):
            old.replace_all_uses_with(new)
        graph.remove(node)
        result.count("merged node")
    graph.remove_unused()
    return result


@register_pass("dce")
def dce(graph: Graph) -> PassResult:
    """Remove nodes and constants nothing uses."""
    result = PassResult()
    result.count("removed", graph.remove_unused())
    return result


@register_pass("canonicalize")
def canonicalize(graph: Graph) -> PassResult:
    """fold-constants, simplify, cse, dce until nothing changes."""
    total = PassResult()
    for _ in range(8):
        changed = False
        for step in (fold_constants, simplify, cse, dce):
            r = step(graph)
            total.counts.update(r.counts)
            changed |= r.modified
        total.modified |= changed
        if not changed:
            break
    return total

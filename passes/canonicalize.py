"""Canonicalisation: fold what is known, drop no-op shape ops, merge duplicates, remove dead code.

Fusions run after this, so their patterns see one spelling of each idiom:
no Identity, no Cast to the same type, no Reshape/Expand to the shape a value
already has, no identity Transpose, a Transpose of a Transpose merged, and no
ScatterND that only writes a contiguous run of rows (exporters spell
`k[..., :d] = a; k[..., d:] = b` that way; it is a Concat, which every target
runs as a copy instead of a serial scatter loop).
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


def _static_rows(v: Value):
    """The static extent of `v`'s axis 0, or None."""
    t = v.type
    if isinstance(t, TensorType) and t.shape and isinstance(t.shape[0], int):
        return t.shape[0]
    return None


def _row_run(node: Node):
    """(start, count) if this ScatterND overwrites rows start..start+count-1 of axis 0, in order."""
    if node.attrs.get("reduction", "none") != "none" or len(node.inputs) != 3:
        return None
    data, idx = node.inputs[0], node.inputs[1]
    rows = _static_rows(data)
    if rows is None or not idx.is_constant or idx.const.ndim != 2 or idx.const.shape[1] != 1 or not idx.const.size:
        return None
    ix = idx.const[:, 0].astype(np.int64)
    ix = np.where(ix < 0, ix + rows, ix)
    start = int(ix[0])
    if start < 0 or not np.array_equal(ix, np.arange(start, start + len(ix))) or start + len(ix) > rows:
        return None
    return start, len(ix)


def _rows_slice(graph: Graph, x: Value, start: int, stop: int, before: Node) -> Value:
    t = x.type
    out_t = TensorType(t.dtype, (stop - start,) + tuple(t.shape[1:]))
    consts = [graph.add_constant(graph.unique_name(n), np.array([v], np.int64))
              for n, v in (("rows_start", start), ("rows_stop", stop), ("rows_axis", 0))]
    return graph.make_node("Slice", [x, *consts], types=[out_t], before=before).outputs[0]


def _scatter_as_concat(graph: Graph, node: Node) -> bool:
    run = _row_run(node)
    if run is None:
        return False
    (start, count), data, upd = run, node.inputs[0], node.inputs[2]
    rows = _static_rows(data)
    pieces = ([_rows_slice(graph, data, 0, start, node)] if start else []) + [upd] + \
        ([_rows_slice(graph, data, start + count, rows, node)] if start + count < rows else [])
    y = node.outputs[0]
    if len(pieces) == 1:
        if not _same_type(upd, y) or y.is_graph_output:
            return False
        y.replace_all_uses_with(upd)
    else:
        _replace(y, graph.make_node("Concat", pieces, attrs={"axis": 0}, types=[y.type], before=node).outputs[0])
    graph.remove(node)
    return True


def _replace(old: Value, new: Value) -> None:
    """Redirect `old`'s uses to `new`, which takes over its name if it is a graph output."""
    old.replace_all_uses_with(new)
    if new.is_graph_output:
        new.name, old.name = old.name, new.name


def _slice_of_concat(node: Node):
    """The Concat operand(s) a Slice selects exactly (whole operands along the Concat's axis), or None."""
    cat = node.inputs[0].producer if node.inputs and node.inputs[0] is not None else None
    if cat is None or cat.op_type != "Concat" or cat.domain or len(node.inputs) < 4:
        return None
    consts = [v.const if v is not None and v.is_constant else None for v in node.inputs[1:5]]
    starts, ends, axes = consts[:3]
    steps = consts[3] if len(consts) > 3 else np.array([1])
    if any(c is None or c.size != 1 for c in (starts, ends, axes)) or steps is None or int(steps.reshape(-1)[0]) != 1:
        return None
    rank = len(cat.outputs[0].type.shape) if isinstance(cat.outputs[0].type, TensorType) and \
        cat.outputs[0].type.shape is not None else None
    if rank is None or int(axes[0]) % rank != int(cat.attrs.get("axis", 0)) % rank:
        return None
    axis = int(axes[0]) % rank
    sizes = [v.type.shape[axis] if isinstance(v.type, TensorType) and v.type.shape else None for v in cat.inputs]
    if not all(isinstance(n, int) for n in sizes):
        return None
    total = sum(sizes)
    lo, hi = (int(np.clip(c + total if c < 0 else c, 0, total)) for c in (int(starts[0]), int(ends[0])))
    bounds = np.cumsum([0] + sizes)
    if lo >= hi or lo not in bounds or hi not in bounds:
        return None
    i, j = int(np.searchsorted(bounds, lo)), int(np.searchsorted(bounds, hi))
    return cat.inputs[i:j], axis


@register_pass("simplify")
def simplify(graph: Graph) -> PassResult:
    """Forward no-op shape ops; merge Transpose pairs; ScatterND over a row run -> Concat;
    a Slice of whole Concat operands -> those operands."""
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
        elif node.op_type == "ScatterND" and not node.domain:
            if _scatter_as_concat(graph, node):
                result.count("ScatterND as Concat")
        elif node.op_type == "Slice" and not node.domain:
            picked = _slice_of_concat(node)
            if picked is None:
                continue
            parts, axis = picked
            y = node.outputs[0]
            if len(parts) == 1:
                if not _same_type(parts[0], y) or y.is_graph_output:
                    continue
                y.replace_all_uses_with(parts[0])
            else:
                _replace(y, graph.make_node("Concat", list(parts), attrs={"axis": axis}, types=[y.type],
                                            before=node).outputs[0])
            graph.remove(node)
            result.count("Slice of Concat operands")
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

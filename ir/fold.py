"""Evaluate a node over values known before run time.

Numeric inputs run through the op's reference implementation. Shape vectors
with symbolic entries (object arrays of ints and SymExprs) run through the
small set of integer ops exporters use for shape arithmetic; an op over
symbolic values that cannot be decided (`seq == 1`?) is not folded.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import symbolic
from . import dtypes
from .graph import Graph, Node
from .ops import POLYPORT_DOMAIN, known_value
from .symbolic import SymExpr
from .types import TensorType

LOW_BIT_CODES = ("f8e4m3", "i4", "i8")      # signed weight codes: block_dequant reads them back
FOLD_LIMIT = 1 << 16      # largest folded result, in elements: folding must not copy weights
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Bernoulli", "Multinomial", "Dropout"}


def _rank(v) -> int:
    return len(v.type.shape) if isinstance(v.type, TensorType) and v.type.shape is not None else 0


class Undecidable(Exception):
    """The result depends on the value of a symbol."""


def fold(node: Node, opsets: dict[str, int], bindable: frozenset[str]) -> Optional[list[np.ndarray]]:
    """The node's outputs where they are known before run time, else None.

    `bindable` is the set of symbols the graph inputs define: only those may
    appear in a folded result, since only those are known when it runs."""
    if node.domain != "" or node.op_type in _NONDETERMINISTIC or any(True for _ in node.subgraphs()):
        return None
    if node.op_type == "DequantizeLinear" and _rank(node.inputs[0]) >= 2:
        return None       # a quantized weight stays quantized (passes/quant_matmul.py), never an f32 copy
    if node.op_type == "Cast" and _rank(node.inputs[0]) >= 2 and node.inputs[0].dtype is not None \
            and node.inputs[0].dtype.name in LOW_BIT_CODES and node.outputs[0].dtype is not None \
            and node.outputs[0].dtype.is_float:
        return None       # nor do codes an export dequantizes with ordinary ops (passes/block_dequant.py)
    if node.op_type == "Shape":
        return _fold_shape(node, bindable)
    if node.op_type == "Size":
        t = node.inputs[0].type
        if isinstance(t, TensorType) and t.shape is not None and all(d is not None for d in t.shape):
            total = 1
            for d in t.shape:
                total = symbolic.mul(total, d)
            return _checked([_obj([total]).reshape(())], bindable)
        return None
    values = [known_value(v) if v is not None else None for v in node.inputs]
    if any(v is None and i is not None for v, i in zip(values, node.inputs)):
        return None
    if any(v is not None and v.size > FOLD_LIMIT for v in values):
        return None
    if all(v is None or v.dtype != object for v in values):
        from .onnx_reference import StandardOpRunner
        try:
            outs = StandardOpRunner(node, opsets)(values)
        except Exception:  # noqa: BLE001 - a node that fails to fold is left for run time, which reports it
            return None
        if any(not isinstance(o, np.ndarray) or o.size > FOLD_LIMIT for o in outs):
            return None
        return outs
    fn = _SYMBOLIC.get(node.op_type)
    if fn is None:
        return None
    try:
        outs = [np.asarray(o, dtype=object) if not isinstance(o, np.ndarray) else o for o in fn(node, values, opsets.get("", 0))]
    except (Undecidable, ValueError, IndexError, TypeError):
        return None
    return _checked(outs, bindable)


def _checked(outs, bindable):
    for o in outs:
        if o.dtype == object:
            for d in o.flat:
                if isinstance(d, SymExpr) and not d.symbols <= bindable:
                    return None
    return [_demote(o) for o in outs]


def _demote(a: np.ndarray) -> np.ndarray:
    """An object array with no symbolic entry becomes an int64 array."""
    if a.dtype == object and not any(isinstance(d, SymExpr) for d in a.flat):
        if all(isinstance(d, (bool, np.bool_)) for d in a.flat) and a.size:
            return a.astype(np.bool_)
        return a.astype(np.int64)
    return a


def _obj(seq) -> np.ndarray:
    arr = np.empty(len(seq), dtype=object)
    for i, d in enumerate(seq):
        arr[i] = d
    return arr


def _as_obj(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == object else a.astype(object)


def _fold_shape(node, bindable):
    t = node.inputs[0].type
    if not isinstance(t, TensorType) or t.shape is None or any(d is None for d in t.shape):
        return None
    rank = len(t.shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return _checked([_obj(list(t.shape[start:end]))], bindable)


# ---- integer ops over symbolic values --------------------------------------------------
def _elementwise(fn: Callable[[Any, Any], Any]):
    def run(node, values, opset):
        a, b = (_as_obj(v) for v in values[:2])
        def f(x, y):
            r = fn(x, y)
            if r is None:
                raise Undecidable
            return r
        return [np.frompyfunc(f, 2, 1)(a, b)]
    return run


def _trunc_div(x, y):
    if isinstance(x, int) and isinstance(y, int):
        q = abs(x) // abs(y)
        return q if (x >= 0) == (y >= 0) else -q
    if isinstance(y, int) and y != 0 and symbolic.provably_le(0, x):   # floor == trunc for x >= 0
        return symbolic.floordiv(x, y) if y > 0 else symbolic.mul(symbolic.floordiv(x, -y), -1)
    return symbolic.floordiv(x, y) if isinstance(y, SymExpr) else None


def _cmp(pred):
    def f(x, y):
        c = symbolic.compare(x, y)
        if c is None:
            raise Undecidable
        return bool(pred(c))
    return f


def _equal(x, y):
    e = symbolic.equal(x, y)
    if e is None:
        raise Undecidable
    return e


def _ints(v) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _axes(node, values, idx):
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(values) > idx and values[idx] is not None:
        return _ints(values[idx])
    return None


def _gather(node, values, opset):
    data, idx = values
    return [np.take(_as_obj(data), np.asarray(idx).astype(np.int64), axis=node.attrs.get("axis", 0))]


def _concat(node, values, opset):
    return [np.concatenate([_as_obj(v) for v in values], axis=node.attrs["axis"])]


def _unsqueeze(node, values, opset):
    x = _as_obj(values[0])
    axes = _axes(node, values, 1)
    rank = x.ndim + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        x = np.expand_dims(x, a)
    return [x]


def _squeeze(node, values, opset):
    x = _as_obj(values[0])
    axes = _axes(node, values, 1)
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return [np.squeeze(x, tuple(a + x.ndim if a < 0 else a for a in axes))]


def _slice(node, values, opset):
    x = _as_obj(values[0])
    if "starts" in node.attrs:  # opset < 10
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(values[1]), _ints(values[2])
        axes = _ints(values[3]) if len(values) > 3 and values[3] is not None else list(range(len(starts)))
        steps = _ints(values[4]) if len(values) > 4 and values[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + x.ndim if a < 0 else a
        n = x.shape[a]
        s = max(min(s, n), -n - 1)
        e = max(min(e, n), -n - 1)
        if st < 0 and e < -n:
            e = None
        index[a] = slice(s, e, st)
    return [x[tuple(index)]]


def _reshape(node, values, opset):
    x = _as_obj(values[0])
    shape = _ints(values[1])
    allowzero = node.attrs.get("allowzero", 0)
    shape = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _cast(node, values, opset):
    from onnx import TensorProto
    if node.attrs["to"] != TensorProto.INT64:
        raise Undecidable
    return [_as_obj(values[0])]


def _where(node, values, opset):
    cond, a, b = values
    if cond.dtype == object:
        raise Undecidable
    return [np.where(cond.astype(bool), _as_obj(a), _as_obj(b))]


def _expand(node, values, opset):
    x, shape = values
    shape = _ints(shape)
    out = np.broadcast_shapes(x.shape, tuple(shape))
    return [np.broadcast_to(_as_obj(x), out).copy()]


def _variadic(fn):
    def run(node, values, opset):
        acc = _as_obj(values[0])
        for v in values[1:]:
            acc = np.frompyfunc(lambda x, y: _must(fn(x, y)), 2, 1)(acc, _as_obj(v))
        return [acc]
    return run


def _must(r):
    if r is None:
        raise Undecidable
    return r


_SYMBOLIC: dict[str, Callable] = {
    "Identity": lambda node, values, opset: [values[0]],
    "Cast": _cast,
    "Gather": _gather,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Reshape": _reshape,
    "Add": _elementwise(symbolic.add),
    "Sub": _elementwise(symbolic.sub),
    "Mul": _elementwise(symbolic.mul),
    "Div": _elementwise(_trunc_div),
    "Mod": _elementwise(symbolic.mod),
    "Neg": lambda node, values, opset: [np.frompyfunc(lambda x: symbolic.mul(x, -1), 1, 1)(_as_obj(values[0]))],
    "Equal": _elementwise(_equal),
    "Less": _elementwise(_cmp(lambda c: c < 0)),
    "LessOrEqual": _elementwise(_cmp(lambda c: c <= 0)),
    "Greater": _elementwise(_cmp(lambda c: c > 0)),
    "GreaterOrEqual": _elementwise(_cmp(lambda c: c >= 0)),
    "Where": _where,
    "Expand": _expand,
    "Max": _variadic(symbolic.dim_max),
    "Min": _variadic(symbolic.dim_min),
}


def materialise(graph: Graph, node: Node, values: Sequence[np.ndarray]) -> None:
    """Replace `node` by what `fold` computed: its outputs become constants, or
    `ShapeValue` nodes where symbolic. The output Values keep their names and uses."""
    node._detach_inputs()
    if node.graph is graph:
        graph._nodes.pop(node)
        node.graph = None
    for v, arr in zip(node.outputs, values):
        v.producer = None
        if arr.dtype == object:
            v.type = TensorType(dtypes.I64, arr.shape)
            sv = Node("ShapeValue", [], [v], {"dims": list(arr.reshape(-1)), "scalar": int(arr.ndim == 0)},
                      POLYPORT_DOMAIN, graph.unique_name(f"{node.name}_shape"))
            graph.append(sv)
            continue
        declared = v.type.dtype if isinstance(v.type, TensorType) else None
        if declared is not None and declared.numpy is not None and declared.name != "str" \
                and arr.dtype != declared.numpy:
            arr = arr.astype(declared.numpy)
        v.const = arr
        v.type = TensorType(dtypes.from_numpy(arr.dtype), arr.shape)
        graph.constants[v.name] = v

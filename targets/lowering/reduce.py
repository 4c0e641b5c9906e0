"""Reductions, ArgMax/ArgMin and the softmax family (LogSoftmax, Hardmax; Softmax's opset < 13 form)."""
from __future__ import annotations

import numpy as np

from . import FLOAT, FLOAT_BF, NUMERIC, lowers
from .elementwise import const


def axes_attr_or_input(lw, node):
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return [lw.as_int(a) for a in lw.ints(node.inputs[1], "axes", node)]
    return None


def _reduce(lw, node, x, fn):
    """Apply `fn(x, axes, keepdims)` with ONNX's axes rules (empty axes: all, or identity with noop_with_empty_axes)."""
    axes = axes_attr_or_input(lw, node)
    if axes is not None and not axes and node.attrs.get("noop_with_empty_axes", 0):
        return None
    return fn(x, axes or None, bool(node.attrs.get("keepdims", 1)))


@lowers("ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp",
        dtypes=NUMERIC)
def reduce_composite(lw, node):
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    kind = node.op_type
    if kind in ("ReduceL2", "ReduceLogSum", "ReduceLogSumExp") and str(node.inputs[0].dtype) not in FLOAT:
        raise lw.unsupported(node, f"dtype {node.inputs[0].dtype} is not supported (float only here)")
    pre = {"ReduceL1": op.abs, "ReduceL2": op.square, "ReduceSumSquare": op.square}.get(kind)
    if kind == "ReduceLogSumExp":
        return _log_sum_exp(lw, node, x)
    if pre is not None:
        x = lw.emit(pre(x))
    y = _reduce(lw, node, x, op.prod if kind == "ReduceProd" else op.sum)
    if y is None:         # noop_with_empty_axes: the elementwise part still applies
        y = x
    y = lw.emit(y)
    if kind == "ReduceL2":
        y = lw.emit(op.sqrt(y))
    elif kind == "ReduceLogSum":
        y = lw.emit(op.log(y))
    return y


def _log_sum_exp(lw, node, x):
    op = lw.relax.op
    m = _reduce(lw, node, x, lambda x, axes, keep: op.max(x, axes, True))
    if m is None:
        return x
    m = lw.emit(m)
    # a row of -inf has max -inf: shift by 0 there so exp gives 0 and the log -inf, not NaN
    m = lw.emit(op.where(op.isfinite(m), m, op.zeros_like(m)))
    s = lw.emit(_reduce(lw, node, op.exp(op.subtract(x, m)), op.sum))
    keep = bool(node.attrs.get("keepdims", 1))
    axes = axes_attr_or_input(lw, node)
    mk = m if keep else lw.emit(op.squeeze(m, axes) if axes else op.reshape(m, []))
    return lw.emit(op.add(op.log(s), mk))


@lowers("ArgMax", "ArgMin", dtypes=NUMERIC)
def arg_extreme(lw, node):
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    rank = len(lw.shape(x))
    axis = node.attrs.get("axis", 0) % rank
    keep = bool(node.attrs.get("keepdims", 1))
    fn = op.argmax if node.op_type == "ArgMax" else op.argmin
    if not node.attrs.get("select_last_index", 0):
        return lw.emit(fn(x, axis, keep))
    # the last of equal extremes: the first in the reversed axis, mapped back
    idx = lw.emit(fn(op.flip(x, axis), axis, keep))
    n = lw.as_int(lw.shape(x)[axis])
    if n is None:
        raise lw.unsupported(node, "select_last_index needs a static size on the reduced axis")
    return lw.emit(op.subtract(lw.relax.const(n - 1, "int64"), idx))


def coerced_2d(lw, node, fn):
    """Softmax-family ops before opset 13 act on the input flattened to 2-D at `axis` (default 1)."""
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    shape = lw.shape(x)
    opset = lw.graph.opset_imports.get("", 13)
    if opset >= 13:
        return lw.emit(fn(x, node.attrs.get("axis", -1)))
    axis = node.attrs.get("axis", 1) % max(len(shape), 1)
    rows = 1
    for d in shape[:axis]:
        rows = rows * d
    x2 = lw.emit(op.reshape(x, [lw.simplify(rows), -1]))
    return lw.emit(op.reshape(fn(x2, 1), shape))


@lowers("LogSoftmax", dtypes=FLOAT)
def log_softmax(lw, node):
    return coerced_2d(lw, node, lw.relax.op.nn.log_softmax)


@lowers("Hardmax", dtypes=FLOAT)
def hardmax(lw, node):
    op = lw.relax.op

    def fn(x, axis):
        shape = lw.shape(x)
        axis %= len(shape)
        idx = lw.emit(op.argmax(x, axis, True))
        pos = lw.emit(op.reshape(lw.emit(op.arange(0, shape[axis], 1, "int64")), [-1] + [1] * (len(shape) - axis - 1)))
        return op.astype(op.equal(pos, idx), x.ty.dtype)
    return coerced_2d(lw, node, fn)


def _empty_extreme(dtype: str, name: str):
    """ReduceMax / ReduceMin of no elements: the dtype's lowest / highest value (ONNX's reference)."""
    low = name == "max"
    if dtype == "bool":
        return not low
    if np.issubdtype(np.dtype(dtype), np.floating):
        return -np.inf if low else np.inf
    info = np.iinfo(dtype)
    return int(info.min if low else info.max)


def _plain(lw, node, name):
    """ReduceSum/Max/Min/Mean: one Relax reduction (`name`: sum, max, min, mean; bool through int8)."""
    fn = getattr(lw.relax.op, name)
    x = lw.get(node.inputs[0])
    axes = axes_attr_or_input(lw, node)
    if axes is not None and not axes and node.attrs.get("noop_with_empty_axes", 0):
        return x
    shape = lw.shape(x)
    reduced = [a % len(shape) for a in axes] if axes else range(len(shape))
    keep = bool(node.attrs.get("keepdims", 1))
    if name in ("max", "min") and any(lw.as_int(shape[a]) == 0 for a in reduced):
        # TVM's reduction over an empty axis never runs its init: it would return uninitialised memory
        out = [1 if a in reduced else d for a, d in enumerate(shape) if keep or a not in reduced]
        dtype = str(x.ty.dtype)
        return lw.emit(lw.relax.op.broadcast_to(lw.relax.const(_empty_extreme(dtype, name), dtype),
                                                lw.relax.ShapeExpr(out)))
    if x.ty.dtype == "bool":          # TVM has no max/min identity for bool: reduce it as int8
        y = lw.emit(fn(lw.relax.op.astype(x, "int8"), axes or None, keep))
        return lw.emit(lw.relax.op.astype(y, "bool"))
    return lw.emit(fn(x, axes or None, keep))


for _op, _name in {"ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min", "ReduceMean": "mean"}.items():
    lowers(_op)(lambda lw, node, _name=_name: _plain(lw, node, _name))


@lowers("CumSum")
def cum_sum(lw, node):
    axis = lw.known(node.inputs[1])
    if axis is None:
        raise lw.unsupported(node, "axis must be a constant")
    x = lw.get(node.inputs[0])
    axis = int(axis.reshape(-1)[0])
    rev = node.attrs.get("reverse", 0)
    if rev:                       # a reversed scan is the scan of the flipped axis, flipped back
        x = lw.emit(lw.relax.op.flip(x, axis))
    y = lw.emit(lw.relax.op.cumsum(x, axis, exclusive=bool(node.attrs.get("exclusive", 0))))
    return lw.emit(lw.relax.op.flip(y, axis)) if rev else y


@lowers("TopK")
def top_k(lw, node):
    k = lw.known(node.inputs[1])
    if k is None or lw.as_int(k.reshape(-1)[0]) is None:
        raise lw.unsupported(node, "k must be a constant")
    x = lw.get(node.inputs[0])
    tup = lw.emit(lw.relax.op.topk(x, lw.as_int(k.reshape(-1)[0]), node.attrs.get("axis", -1), "both",
                                       bool(node.attrs.get("largest", 1)), "int64"))
    return [lw.emit(lw.relax.TupleGetItem(tup, 0)), lw.emit(lw.relax.TupleGetItem(tup, 1))]


@lowers("Softmax", dtypes=FLOAT_BF)
def softmax(lw, node):
    return coerced_2d(lw, node, lw.relax.op.nn.softmax)

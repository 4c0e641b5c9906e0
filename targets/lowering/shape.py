"""Shape and indexing ops: Reshape, Squeeze/Unsqueeze, Concat, Gather, Slice, Split, Expand, ...

Where the data is a known shape vector they compute on it (the result stays a known value);
otherwise they emit the Relax op."""
from __future__ import annotations

import numpy as np

from ...ir.types import TensorType
from . import lowers

INT64_BIG = 1 << 62      # Slice bounds at or past this mean "to the end"


@lowers("polyport::ShapeValue")
def shape_value(lw, node):
    dims = [lw.dim(d) for d in node.attrs["dims"]]
    arr = np.empty(len(dims), dtype=object)
    arr[:] = dims
    return arr.reshape(()) if node.attrs.get("scalar") else arr


@lowers("Cast")
def cast(lw, node):
    dt = lw.tvm_dtype(node.outputs[0].type)
    a = lw.known(node.inputs[0])
    if a is not None and dt in ("int64", "int32"):
        return a
    return lw.emit(lw.relax.op.astype(lw.get(node.inputs[0]), dt))


@lowers("Identity")
def identity(lw, node):
    a = lw.known(node.inputs[0])
    return a if a is not None else lw.get(node.inputs[0])


@lowers("Transpose")
def transpose(lw, node):
    x = lw.get(node.inputs[0])
    perm = node.attrs.get("perm")
    return lw.emit(lw.relax.op.permute_dims(x, perm))


@lowers("Reshape")
def reshape(lw, node):
    x = node.inputs[0]
    a = lw.known(x)
    shape = out_shape(lw, node)
    if shape is None:
        target = lw.ints(node.inputs[1], "shape", node)
        in_shape = lw.shape(lw.get(x)) if a is None else [lw.dim(n) for n in a.shape]
        shape = []
        for i, d in enumerate(target):
            di = lw.as_int(d)
            if di == 0 and not node.attrs.get("allowzero", 0):
                shape.append(in_shape[i])
            else:
                shape.append(d)
        if any(lw.as_int(d) == -1 for d in shape):
            total = 1
            for d in in_shape:
                total = total * d
            known = 1
            for d in shape:
                if lw.as_int(d) != -1:
                    known = known * lw.prim(d)
            shape = [lw.simplify(lw.tirx.floordiv(lw.prim(total), known)) if lw.as_int(d) == -1 else d
                     for d in shape]
        shape = [lw.simplify(lw.prim(d)) for d in shape]
    if a is not None and all(lw.as_int(d) is not None for d in shape):
        return a.reshape([lw.as_int(d) for d in shape])
    return lw.emit(lw.relax.op.reshape(lw.get(x), shape))


@lowers("Unsqueeze")
def unsqueeze(lw, node):
    x = lw.get(node.inputs[0]) if lw.known(node.inputs[0]) is None else None
    if x is not None and out_shape(lw, node) is None:
        axes = [lw.as_int(d) for d in lw.ints(node.inputs[1], "axes", node)]
        r = len(lw.shape(x)) + len(axes)
        out = x
        for ax in sorted(a % r for a in axes):
            out = lw.emit(lw.relax.op.expand_dims(out, ax))
        return out
    return axes_reshape(lw, node)


@lowers("Squeeze")
def squeeze(lw, node):
    if out_shape(lw, node) is None and lw.known(node.inputs[0]) is None:
        x = lw.get(node.inputs[0])
        axes = None if len(node.inputs) < 2 or node.inputs[1] is None else \
            [lw.as_int(d) for d in lw.ints(node.inputs[1], "axes", node)]
        return lw.emit(lw.relax.op.squeeze(x, axes))
    return axes_reshape(lw, node)


@lowers("Flatten")
def flatten(lw, node):
    return axes_reshape(lw, node)


@lowers("Concat")
def concat(lw, node):
    axis = node.attrs["axis"]
    arrs = [lw.known(v) for v in node.inputs]
    if all(a is not None for a in arrs):
        return np.concatenate(arrs, axis=axis)
    xs = [lw.get(v) for v in node.inputs]
    return lw.emit(lw.relax.op.concat(xs, axis=axis))


@lowers("Gather")
def gather(lw, node):
    axis = node.attrs.get("axis", 0)
    a, i = lw.known(node.inputs[0]), lw.known(node.inputs[1])
    if a is not None and i is not None and all(lw.as_int(x) is not None for x in i.flat):
        idx = np.array([lw.as_int(x) for x in i.flat], dtype=np.int64).reshape(i.shape)
        return np.take(a, idx, axis=axis)
    data, ind = lw.get(node.inputs[0]), lw.get(node.inputs[1])
    return lw.emit(lw.relax.op.take(data, ind, axis=axis, mode="wrap"))


@lowers("GatherND")
def gather_nd(lw, node):
    data, ind = lw.get(node.inputs[0]), lw.get(node.inputs[1])
    return lw.emit(lw.relax.op.gather_nd(data, ind, node.attrs.get("batch_dims", 0)))


@lowers("GatherElements")
def gather_elements(lw, node):
    data, ind = lw.get(node.inputs[0]), lw.get(node.inputs[1])
    return lw.emit(lw.relax.op.gather_elements(data, ind, node.attrs.get("axis", 0)))


@lowers("ScatterND")
def scatter_nd(lw, node):
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise lw.unsupported(node, f"reduction={node.attrs['reduction']}")
    d, i, u = (lw.get(v) for v in node.inputs)
    return lw.emit(lw.relax.op.scatter_nd(d, i, u, "update"))


@lowers("ScatterElements")
def scatter_elements(lw, node):
    red = node.attrs.get("reduction", "none")
    d, i, u = (lw.get(v) for v in node.inputs)
    return lw.emit(lw.relax.op.scatter_elements(d, i, u, node.attrs.get("axis", 0),
                                                    "update" if red == "none" else red))


@lowers("Expand")
def expand(lw, node):
    x = lw.get(node.inputs[0])
    shape = out_shape(lw, node)
    if shape is None:
        target = lw.ints(node.inputs[1], "shape", node)
        xs = lw.shape(x)
        r = max(len(xs), len(target))
        xs = [1] * (r - len(xs)) + xs
        target = [1] * (r - len(target)) + target
        shape = [t if lw.as_int(a) == 1 else a for a, t in zip(xs, target)]
        shape = [lw.simplify(lw.prim(d)) for d in shape]
    return lw.emit(lw.relax.op.broadcast_to(x, shape))


@lowers("ConstantOfShape")
def constant_of_shape(lw, node):
    value = node.attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value)
    shape = out_shape(lw, node) or [lw.simplify(lw.prim(d)) for d in lw.ints(node.inputs[0], "shape", node)]
    fill = lw.relax.const(value.reshape(()), "bool" if value.dtype == bool else str(value.dtype))
    # not R.full: TVM 0.27 legalizes it with a PrimType dtype where topi.full wants a string (TypeError)
    return lw.emit(lw.relax.op.broadcast_to(fill, shape))


@lowers("Range")
def range_op(lw, node):
    start, limit, delta = (lw.known(v) for v in node.inputs)
    dt = lw.tvm_dtype(node.outputs[0].type)
    if start is None or limit is None or delta is None:
        raise lw.unsupported(node, "start, limit and delta must be known scalars")
    s, l, d = (lw.prim(x.reshape(()).item()) for x in (start, limit, delta))
    return lw.emit(lw.relax.op.arange(s, l, d, dt))


@lowers("Slice")
def slice_op(lw, node):
    x_known = lw.known(node.inputs[0])
    starts = lw.ints(node.inputs[1], "starts", node)
    ends = lw.ints(node.inputs[2], "ends", node)
    x = None if x_known is not None else lw.get(node.inputs[0])
    rank = x_known.ndim if x_known is not None else len(lw.shape(x))
    axes = list(range(len(starts))) if len(node.inputs) < 4 or node.inputs[3] is None else \
        [lw.as_int(a) for a in lw.ints(node.inputs[3], "axes", node)]
    steps = [1] * len(starts) if len(node.inputs) < 5 or node.inputs[4] is None else \
        [lw.as_int(a) for a in lw.ints(node.inputs[4], "steps", node)]
    axes = [a % rank for a in axes]
    if x_known is not None and all(lw.as_int(v) is not None for v in starts + ends):
        sl = [slice(None)] * rank
        for a, s0, e0, st in zip(axes, starts, ends, steps):
            sl[a] = slice(lw.as_int(s0), lw.as_int(e0), st)
        return x_known[tuple(sl)]
    if x is None:
        x = lw.get(node.inputs[0])
    shape = lw.shape(x)
    if any(st is None or st <= 0 for st in steps):
        raise lw.unsupported(node, "negative or unknown steps")
    b, e = [], []
    for a, s0, e0 in zip(axes, starts, ends):
        n = shape[a]
        b.append(norm_index(lw, s0, n))
        e.append(norm_index(lw, e0, n))
    # Bounds normalised into [0, n] need no re-derivation by Relax, whose in-bounds canonicalisation
    # otherwise leaves if_then_else in symbolic shapes (FuseOps cannot infer those; the GPU builds fail).
    inbound = all(lw.analyzer.can_prove(i >= 0) for i in b) and \
        all(lw.analyzer.can_prove(j >= i) for i, j in zip(b, e))
    return lw.emit(lw.relax.op.strided_slice(x, axes, b, e, steps, assume_inbound=inbound))


@lowers("Split")
def split(lw, node):
    x = lw.get(node.inputs[0])
    axis = node.attrs.get("axis", 0)
    shape = lw.shape(x)
    axis %= len(shape)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = lw.ints(node.inputs[1], "split", node)
    else:
        sizes = [lw.dim(o.type.shape[axis]) for o in node.outputs]
    points, acc = [], 0
    for s in sizes[:-1]:
        acc = lw.simplify(lw.prim(acc) + lw.prim(s))
        points.append(acc)
    tup = lw.emit(lw.relax.op.split(x, points, axis))
    return [lw.emit(lw.relax.TupleGetItem(tup, i)) for i in range(len(node.outputs))]


def out_shape(lw, node, i=0):
    t = node.outputs[i].type
    if isinstance(t, TensorType) and t.shape is not None and all(d is not None for d in t.shape):
        return [lw.dim(d) for d in t.shape]
    return None


def axes_reshape(lw, node):
    a = lw.known(node.inputs[0])
    shape = out_shape(lw, node)
    if a is not None and shape is not None and all(lw.as_int(d) is not None for d in shape):
        return a.reshape([lw.as_int(d) for d in shape])
    if shape is None:
        raise lw.unsupported(node, "its output shape is not known")
    return lw.emit(lw.relax.op.reshape(lw.get(node.inputs[0]), shape))


def norm_index(lw, v, n):
    iv = lw.as_int(v)
    tirx = lw.tirx
    if iv is not None:
        if iv >= INT64_BIG:
            return n
        if iv <= -INT64_BIG:
            return tirx.IntImm("int64", 0)
        if iv < 0:
            return lw.simplify(tirx.max(n + iv, 0))
        ni = lw.as_int(n)
        return tirx.IntImm("int64", min(iv, ni)) if ni is not None else lw.simplify(tirx.min(iv, n))
    return lw.simplify(tirx.min(lw.prim(v), n))

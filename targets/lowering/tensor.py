"""Data-movement ONNX ops: Pad, Tile, Trilu, OneHot, DepthToSpace/SpaceToDepth, EyeLike, Einsum, Shape, Size,
CumProd, (De)QuantizeLinear."""
from __future__ import annotations

import numpy as np

from . import ANY, FLOAT, NUMERIC, lowers


def _known_ints(lw, node, i, what):
    """Input `i` as Python ints (it must be known when the graph is built)."""
    vals = [lw.as_int(v) for v in lw.ints(node.inputs[i], what, node)]
    if any(v is None for v in vals):
        raise lw.unsupported(node, f"its {what} input must be a constant")
    return vals


def _has(node, i):
    return len(node.inputs) > i and node.inputs[i] is not None


@lowers("Pad", dtypes=NUMERIC + ("bool",))
def pad(lw, node):
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    rank = len(lw.shape(x))
    pads = list(node.attrs["pads"]) if "pads" in node.attrs else _known_ints(lw, node, 1, "pads")
    axes = _known_ints(lw, node, 3, "axes") if _has(node, 3) else list(range(rank))
    width = [0] * (2 * rank)
    for j, a in enumerate(axes):
        width[2 * (a % rank)] = pads[j]
        width[2 * (a % rank) + 1] = pads[j + len(axes)]
    if any(w < 0 for w in width):
        raise lw.unsupported(node, "negative pads (cropping)")
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = 0.0
    if "value" in node.attrs:
        value = float(node.attrs["value"])
    elif _has(node, 2):
        v = lw.known(node.inputs[2])
        if v is None:
            c = node.inputs[2].const if node.inputs[2].is_constant else None
            if c is None:
                raise lw.unsupported(node, "its constant_value input must be a constant")
            v = c
        value = np.asarray(v, dtype=object).reshape(-1)[0]
        value = float(value) if not isinstance(value, (bool, np.bool_)) else float(bool(value))
    # Relax's legalized pad gives zeros for "edge" in TVM 0.27: refused rather than wrong
    mode = {"constant": "constant", "reflect": "reflect", "wrap": "circular"}.get(mode)
    if mode is None:
        raise lw.unsupported(node, f"mode {node.attrs.get('mode')}")
    return lw.emit(op.nn.pad(x, width, mode, value))


@lowers("Tile", dtypes=ANY)
def tile(lw, node):
    """x [d0, d1, ..] -> [r0, d0, r1, d1, ..] by broadcast -> [r0*d0, r1*d1, ..]. Not R.tile: TVM 0.27's
    LLVM build of topi.tile returns garbage (NaNs) for every AVX-512 mcpu tried (x86-64-v4,
    skylake-avx512, sapphirerapids, znver4); broadcast and reshape compute the same without it."""
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    reps = [lw.simplify(lw.prim(r)) for r in _known_ints(lw, node, 1, "repeats")]
    dims = lw.shape(x)
    if len(reps) != len(dims):
        raise lw.unsupported(node, f"{len(reps)} repeats for a rank-{len(dims)} input")
    one = lw.simplify(1)
    spread = lw.emit(op.reshape(x, [e for d in dims for e in (one, d)]))
    spread = lw.emit(op.broadcast_to(spread, [e for r, d in zip(reps, dims) for e in (r, d)]))
    return lw.emit(op.reshape(spread, [lw.simplify(r * d) for r, d in zip(reps, dims)]))


@lowers("Trilu", dtypes=ANY)
def trilu(lw, node):
    op = lw.relax.op
    k = _known_ints(lw, node, 1, "k")[0] if _has(node, 1) else 0
    fn = op.triu if node.attrs.get("upper", 1) else op.tril
    return lw.emit(fn(lw.get(node.inputs[0]), k))


@lowers("OneHot", dtypes=NUMERIC)
def one_hot(lw, node):
    op = lw.relax.op
    idx, values = lw.get(node.inputs[0]), lw.get(node.inputs[2])
    depth = lw.known(node.inputs[1])
    if depth is None and node.inputs[1].is_constant:
        depth = node.inputs[1].const
    if depth is None:
        raise lw.unsupported(node, "its depth input must be a constant")
    depth = int(np.asarray(depth, dtype=object).reshape(-1)[0])
    rank = len(lw.shape(idx))
    axis = node.attrs.get("axis", -1) % (rank + 1)
    idx = lw.emit(op.astype(idx, "int64"))
    idx = lw.emit(op.where(op.less(idx, lw.relax.const(0, "int64")), op.add(idx, lw.relax.const(depth, "int64")), idx))
    pos = op.reshape(lw.emit(op.arange(0, depth, 1, "int64")), [-1] + [1] * (rank - axis))
    hot = lw.emit(op.equal(op.expand_dims(idx, axis), pos))
    off = op.take(values, lw.relax.const(0, "int64"), axis=0)
    on = op.take(values, lw.relax.const(1, "int64"), axis=0)
    return lw.emit(op.where(hot, on, off))


def _blocks(lw, node):
    x = lw.get(node.inputs[0])
    b = int(node.attrs["blocksize"])
    n, c, h, w = lw.shape(x)
    return x, b, n, c, h, w


@lowers("DepthToSpace", dtypes=ANY)
def depth_to_space(lw, node):
    op = lw.relax.op
    x, b, n, c, h, w = _blocks(lw, node)
    cc = lw.simplify(lw.tirx.floordiv(c, b * b))
    mode = node.attrs.get("mode", "DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "DCR":
        y = op.permute_dims(op.reshape(x, [n, b, b, cc, h, w]), [0, 3, 4, 1, 5, 2])
    else:
        y = op.permute_dims(op.reshape(x, [n, cc, b, b, h, w]), [0, 1, 4, 2, 5, 3])
    return lw.emit(op.reshape(y, [n, cc, h * b, w * b]))


@lowers("SpaceToDepth", dtypes=ANY)
def space_to_depth(lw, node):
    op = lw.relax.op
    x, b, n, c, h, w = _blocks(lw, node)
    hh, ww = (lw.simplify(lw.tirx.floordiv(d, b)) for d in (h, w))
    mode = node.attrs.get("mode", "DCR")
    crd = (mode.decode() if isinstance(mode, bytes) else mode) == "CRD"
    y = op.permute_dims(op.reshape(x, [n, c, hh, b, ww, b]), [0, 1, 3, 5, 2, 4] if crd else [0, 3, 5, 1, 2, 4])
    return lw.emit(op.reshape(y, [n, c * b * b, hh, ww]))


@lowers("EyeLike", dtypes=ANY)
def eye_like(lw, node):
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    rows, cols = lw.shape(x)
    k = int(node.attrs.get("k", 0))
    r = op.reshape(lw.emit(op.arange(0, rows, 1, "int64")), [-1, 1])
    c = op.arange(0, cols, 1, "int64")
    diag = op.equal(op.subtract(c, r), lw.relax.const(k, "int64"))
    return lw.emit(op.astype(diag, lw.tvm_dtype(node.outputs[0].type)))


@lowers("Einsum", dtypes=NUMERIC)
def einsum(lw, node):
    eq = node.attrs["equation"]
    eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
    return lw.emit(lw.relax.op.einsum([lw.get(v) for v in node.inputs], eq))


@lowers("Shape", dtypes=ANY + ("bf16",))
def shape(lw, node):
    """Dims as a known int64 vector (what Reshape / Slice read symbolically), sliced by start/end."""
    x = lw.get(node.inputs[0])
    dims = lw.shape(x)
    r = len(dims)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", r)
    start, end = (min(max(v + r if v < 0 else v, 0), r) for v in (start, end))
    arr = np.empty(max(end - start, 0), dtype=object)
    arr[:] = [lw.as_int(d) if lw.as_int(d) is not None else d for d in dims[start:end]]
    return arr


@lowers("Size", dtypes=ANY + ("bf16",))
def size(lw, node):
    total = 1
    for d in lw.shape(lw.get(node.inputs[0])):
        total = total * d
    return np.array(lw.simplify(total) if not isinstance(total, int) else total, dtype=object).reshape(())


@lowers("CumProd", dtypes=NUMERIC)
def cum_prod(lw, node):
    op = lw.relax.op
    axis = _known_ints(lw, node, 1, "axis")[0]
    x = lw.get(node.inputs[0])
    rev = node.attrs.get("reverse", 0)
    if rev:
        x = lw.emit(op.flip(x, axis))
    y = lw.emit(op.cumprod(x, axis, exclusive=bool(node.attrs.get("exclusive", 0))))
    return lw.emit(op.flip(y, axis)) if rev else y


def _per_axis(lw, node, i, x_rank, dtype="float32"):
    """Input `i` (a scale / zero point) as `dtype`, shaped to broadcast against x: scalar, or 1-D along `axis`."""
    op = lw.relax.op
    v = lw.emit(op.astype(lw.get(node.inputs[i]), dtype))
    vr = node.inputs[i].type.rank
    if vr == 0:
        return v
    if vr != 1 or node.attrs.get("block_size", 0):
        raise lw.unsupported(node, "blocked quantization")
    axis = node.attrs.get("axis", 1) % x_rank
    return op.reshape(v, [-1] + [1] * (x_rank - axis - 1))


@lowers("DequantizeLinear", dtypes=("i8", "u8", "i16", "u16", "i32"))
def dequantize(lw, node):
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    r = len(lw.shape(x))
    out = lw.tvm_dtype(node.outputs[0].type)
    xf = op.astype(x, "float32")
    if _has(node, 2):
        xf = op.subtract(xf, _per_axis(lw, node, 2, r))
    y = lw.emit(op.multiply(xf, _per_axis(lw, node, 1, r)))
    return lw.emit(op.astype(y, out)) if out != "float32" else y


_QRANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535)}


@lowers("QuantizeLinear", dtypes=FLOAT)
def quantize(lw, node):
    op = lw.relax.op
    out = lw.tvm_dtype(node.outputs[0].type)
    if out not in _QRANGE:
        raise lw.unsupported(node, f"output dtype {node.outputs[0].dtype}")
    x = lw.get(node.inputs[0])
    r = len(lw.shape(x))
    # ONNX rounds half to even in float32 (round() is nearbyint under the default rounding mode)
    q = op.round(op.divide(op.astype(x, "float32"), _per_axis(lw, node, 1, r)))
    if _has(node, 2):
        q = op.add(q, _per_axis(lw, node, 2, r))
    lo, hi = _QRANGE[out]
    return lw.emit(op.astype(op.clip(q, lo, hi), out))

"""Type and shape inference for standard ONNX ops (domain ""), exact over symbolic dims.

ONNX's own inference turns every dim it cannot compute into a fresh unknown, so
a Llama export with a symbolic `seq` loses `seq` at the first Reshape, Range or
Slice. The functions here compute those dims as `SymExpr`s instead, so the
compiler can plan memory and specialise kernels per `seq`.

Conventions:
- A dim we cannot decide is `None`; a rank we cannot decide is shape `None`.
  We never guess. We do use the op's validity conditions: a broadcast of `64`
  against an unknown dim is `64`, because a valid model leaves no other result.
- Symbols stand for positive integers; comparisons are "provable for all
  positive values" (see `_le`). One assumption beyond that: Slice bounds of
  magnitude >= 2**31 - 1 (INT32_MAX / INT64_MAX sentinels) mean "past the end",
  i.e. symbolic dims are taken to be smaller than 2**31 - 1.
- Errors the model author caused raise `PolyportError` naming node, op and dims.
- Ops not registered here fall back to ONNX's per-node inference.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import numpy as np
from onnx import defs, helper

from ..errors import PolyportError
from . import dtypes
from .dtypes import BOOL, F32, I32, I64, DType
from .graph import Node, Value
from .ops import InferContext, infers
from .symbolic import SymExpr, add, dim_max, dim_min, equal, floordiv, mod, mul, provably_le, sub
from .types import TensorType, TypeDim

_BIG = 2**31 - 1          # Slice sentinels at or above this mean "to the end"
_ABSENT = object()        # an optional attribute/input that the node does not give

Shape = Optional[tuple]   # a tuple of TypeDims, or None for unknown rank


# ======================================================================================
# Helpers
# ======================================================================================

def _fail(node: Node, message: str):
    raise PolyportError(f"{node.op_type} node {node.name!r}: {message}")


def _fmt(shape) -> str:
    if shape is None:
        return "[*]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _ttype(v: Optional[Value]) -> Optional[TensorType]:
    t = None if v is None else v.type
    return t if isinstance(t, TensorType) else None


def _shape(v: Optional[Value]) -> Shape:
    t = _ttype(v)
    return None if t is None or t.shape is None else tuple(t.shape)


def _dtype(v: Optional[Value]) -> Optional[DType]:
    t = _ttype(v)
    return None if t is None else t.dtype


def _out(dtype: Optional[DType], shape) -> TensorType:
    return TensorType(dtype, None if shape is None else tuple(shape))


def _input(node: Node, i: int) -> Optional[Value]:
    """Input i, or None where it is omitted (trailing optional inputs may be missing)."""
    return node.inputs[i] if i < len(node.inputs) else None


def _to_dtype(node: Node, code: int) -> DType:
    try:
        return dtypes.from_onnx(int(code))
    except dtypes.UnknownDType as e:
        _fail(node, str(e))


@functools.lru_cache(maxsize=None)
def _schema_default(op: str, opset: int, name: str) -> Any:
    try:
        schema = defs.get_schema(op, opset, "")
    except defs.SchemaError:
        return None
    a = schema.attributes.get(name)
    if a is None or not a.default_value.type:
        return None
    return _plain(helper.get_attribute_value(a.default_value))


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(x) for x in value]
    return value


def _attr(node: Node, ctx: InferContext, name: str, fallback: Any = None) -> Any:
    """The node's attribute, else the schema default at ctx.opset, else `fallback`."""
    if name in node.attrs:
        return _plain(node.attrs[name])
    d = _schema_default(node.op_type, ctx.opset, name)
    return fallback if d is None else d


def _py(x: Any) -> Any:
    if isinstance(x, (bool, np.bool_)):
        return int(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x  # int, float, SymExpr, None


def _known(ctx: InferContext, v: Optional[Value]) -> Optional[list]:
    """v's value flattened to Python ints / floats / SymExprs, or None when not known."""
    if v is None:
        return None
    arr = ctx.value(v)
    if arr is None:
        return None
    return [_py(x) for x in np.asarray(arr).reshape(-1).tolist()]


def _known_ints(ctx: InferContext, v: Optional[Value]) -> Optional[list[int]]:
    vals = _known(ctx, v)
    if vals is None or not all(isinstance(x, int) for x in vals):
        return None
    return vals


def _moved(node: Node, ctx: InferContext, index: int, attr: str, since: int) -> Any:
    """An int list that moved from attribute `attr` to input `index` at opset `since`.

    Returns _ABSENT when the node gives neither, None when it is an input whose value
    is unknown before run time, else the list. The form of ctx.opset is preferred;
    the other is accepted too, since either carries the same meaning.
    """
    v = _input(node, index)
    from_input = v is not None
    if from_input and (ctx.opset >= since or attr not in node.attrs):
        return _known_ints(ctx, v)
    if attr in node.attrs:
        a = node.attrs[attr]
        return [int(x) for x in a] if isinstance(a, (list, tuple, np.ndarray)) else [int(a)]
    return _ABSENT


def _static_len(v: Optional[Value]) -> Optional[int]:
    """Length of a 1-D input whose value is unknown but whose shape is static."""
    s = _shape(v)
    return s[0] if s is not None and len(s) == 1 and isinstance(s[0], int) else None


def _axis(node: Node, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        _fail(node, f"axis {axis} is out of range for rank {rank}")
    return axis % rank


def _axes(node: Node, axes: Sequence[int], rank: int) -> list[int]:
    out = [_axis(node, a, rank) for a in axes]
    if len(set(out)) != len(out):
        _fail(node, f"axes {list(axes)} repeat an axis")
    return out


# ---- provable arithmetic on dims -----------------------------------------------------

def _le(a, b) -> bool:
    """a <= b for every positive value of the symbols (False where unprovable or unknown)."""
    return a is not None and b is not None and provably_le(a, b)


def _ge2(d) -> bool:
    """Provably at least 2: such a dim cannot be the 1 of a broadcast."""
    return _le(2, d)


def _same(a, b) -> Optional[bool]:
    if a is None or b is None:
        return None
    return equal(a, b)


def _clamp(x, lo, hi):
    if x is None:
        return None
    if _le(x, lo):
        return lo
    if _le(hi, x):
        return hi
    if _le(lo, x):
        return x if _le(x, hi) else dim_min(x, hi)
    if _le(x, hi) and _le(lo, hi):
        return dim_max(x, lo)
    return None


def _max0(d):
    if d is None:
        return None
    return dim_max(d, 0)


def _exact_div(a, b):
    """a / b when provably exact, else None; a provable remainder returns False."""
    if a is None or b is None or (isinstance(b, int) and b == 0):
        return None
    if _same(a, b):
        return 1
    r = mod(a, b)
    if r is None or isinstance(r, SymExpr):  # a remainder that depends on the symbols
        return None
    if r != 0:
        return False
    return floordiv(a, b)


def _ceil_div(a, k: int):
    """ceil(a / k) for an int k != 0, as (a + k - 1) // k (an atom where k does not divide a)."""
    if a is None or k == 0:
        return None
    if k < 0:
        a, k = mul(a, -1), -k
    return floordiv(add(a, k - 1), k)


def _prod(dims) -> TypeDim:
    total = 1
    for d in dims:
        if d is None:
            return None
        total = mul(total, d)
    return total


def _bcast_dim(node: Node, a: TypeDim, b: TypeDim) -> TypeDim:
    """NumPy broadcasting of two dims where one may be symbolic or unknown.

    A dim that is provably >= 2 fixes the result (the other must be 1 or equal);
    a symbolic dim that may be 1 leaves it open (None).
    """
    if a is None or b is None:
        k = b if a is None else a
        return k if _ge2(k) else None
    if equal(a, b):
        return a
    if a == 1 or b == 1:
        return b if a == 1 else a
    a_fixed, b_fixed = _ge2(a) or a == 0, _ge2(b) or b == 0
    if a_fixed and b_fixed and equal(a, b) is False:
        _fail(node, f"dims {a} and {b} do not broadcast")
    if _ge2(a) and not _ge2(b):
        return a
    if _ge2(b) and not _ge2(a):
        return b
    return None


def _broadcast(node: Node, shapes: Sequence[Shape]) -> Shape:
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)
    out: list[TypeDim] = [1] * rank
    for s in shapes:
        padded = (1,) * (rank - len(s)) + tuple(s)
        try:
            out = [_bcast_dim(node, a, b) for a, b in zip(out, padded)]
        except PolyportError:
            _fail(node, f"shapes {', '.join(_fmt(x) for x in shapes)} do not broadcast")
    return tuple(out)


def _unify(node: Node, a: TypeDim, b: TypeDim, what: str) -> TypeDim:
    """Two dims the op requires to be equal: fail when provably not, else the more exact one."""
    if a is None or b is None:
        return b if a is None else a
    e = equal(a, b)
    if e is False:
        _fail(node, f"{what}: {a} != {b}")
    if e or isinstance(a, int):
        return a
    return b if isinstance(b, int) else a


def _same_type(node: Node, ctx: InferContext) -> list:
    t = node.inputs[0].type if node.inputs and node.inputs[0] is not None else TensorType(None, None)
    return [t] * len(node.outputs)


# ======================================================================================
# Elementwise
# ======================================================================================

_UNARY = (
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Sigmoid", "Tanh", "Relu", "Erf", "Sin",
    "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Floor",
    "Ceil", "Round", "Sign", "Not", "Softplus", "Gelu", "LeakyRelu", "Elu", "Selu", "Celu",
    "HardSigmoid", "HardSwish", "Mish", "Softsign", "Swish", "ThresholdedRelu", "Shrink", "Clip",
    "Identity", "Softmax", "LogSoftmax", "Hardmax", "CumSum", "Trilu", "BitwiseNot",
    "ReverseSequence", "LpNormalization", "MeanVarianceNormalization", "LRN",
    "InstanceNormalization", "GroupNormalization", "RotaryEmbedding", "PRelu",
    "ScatterND", "ScatterElements", "Scatter",
)
infers(*_UNARY)(_same_type)


@infers("IsNaN", "IsInf")
def _bool_like(node: Node, ctx: InferContext) -> list:
    return [_out(BOOL, _shape(node.inputs[0]))]


@infers("Dropout")
def _dropout(node: Node, ctx: InferContext) -> list:
    """Output is the input; the optional mask is a bool tensor of the same shape."""
    x = node.inputs[0]
    return [x.type, _out(BOOL, _shape(x))][: len(node.outputs)]


_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "BitShift",
           "BitwiseAnd", "BitwiseOr", "BitwiseXor")
_COMPARE = ("And", "Or", "Xor", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")


@infers(*_BINARY, *_COMPARE)
def _elementwise(node: Node, ctx: InferContext) -> list:
    """Multidirectional broadcast; comparisons and logic produce bool, the rest input 0's type."""
    ins = [v for v in node.inputs if v is not None]
    shape = _broadcast(node, [_shape(v) for v in ins])
    return [_out(BOOL if node.op_type in _COMPARE else _dtype(ins[0]), shape)]


@infers("Where")
def _where(node: Node, ctx: InferContext) -> list:
    shape = _broadcast(node, [_shape(v) for v in node.inputs])
    return [_out(_dtype(node.inputs[1]) or _dtype(node.inputs[2]), shape)]


@infers("Cast")
def _cast(node: Node, ctx: InferContext) -> list:
    if "to" not in node.attrs:
        _fail(node, "missing attribute 'to'")
    return [_out(_to_dtype(node, node.attrs["to"]), _shape(node.inputs[0]))]


@infers("CastLike")
def _cast_like(node: Node, ctx: InferContext) -> list:
    return [_out(_dtype(node.inputs[1]), _shape(node.inputs[0]))]


# ======================================================================================
# Shape manipulation
# ======================================================================================

@infers("Reshape")
def _reshape(node: Node, ctx: InferContext) -> list:
    """Symbolic Reshape: `0` copies, `-1` is the exact quotient of the element counts.

    Dims copied by `0` cancel from both counts, so `[0, 0, -1]` of `[?, seq, 4, 16]`
    still gives `[?, seq, 64]`.
    """
    x, shape_v = node.inputs[0], node.inputs[1]
    dt, xs = _dtype(x), _shape(x)
    target = _known(ctx, shape_v)
    if target is None:
        n = _static_len(shape_v)
        return [_out(dt, None if n is None else [None] * n)]
    allowzero = bool(_attr(node, ctx, "allowzero", 0))
    out: list[TypeDim] = []
    infer_at, copied = None, set()
    for i, t in enumerate(target):
        if t is None or isinstance(t, SymExpr):
            out.append(t)
        elif not isinstance(t, int) or t < -1:
            _fail(node, f"shape entry {t} in {target} is invalid")
        elif t == -1:
            if infer_at is not None:
                _fail(node, f"shape {target} has more than one -1")
            infer_at = i
            out.append(None)
        elif t == 0 and not allowzero:
            if xs is not None and i >= len(xs):
                _fail(node, f"shape {target} copies dim {i} of input {_fmt(xs)}")
            copied.add(i)
            out.append(None if xs is None else xs[i])
        else:
            out.append(t)
    if xs is None or any(d is None for d in target):
        return [_out(dt, out)]
    copied = {i for i in copied if xs[i] != 0}  # a 0 factor must stay in both counts
    num = [d for i, d in enumerate(xs) if i not in copied]
    den = [d for i, d in enumerate(out) if i not in copied and i != infer_at]
    for d in list(den):  # cancel equal non-zero factors; unknown dims cancel only when copied
        hit = next((j for j, n in enumerate(num) if n is not None and n != 0 and _same(n, d)), None)
        if hit is not None:
            del num[hit]
            den.remove(d)
    total, known = _prod(num), _prod(den)
    if infer_at is not None:
        q = _exact_div(total, known)  # None where the other dims multiply to 0
        if q is False:
            _fail(node, f"cannot reshape {_fmt(xs)} to {target}: {total} elements are not a multiple of {known}")
        out[infer_at] = q
    elif total is not None and known is not None and equal(total, known) is False:
        _fail(node, f"cannot reshape {_fmt(xs)} to {_fmt(out)}: element counts differ")
    return [_out(dt, out)]


@infers("Transpose")
def _transpose(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs = _shape(x)
    perm = node.attrs.get("perm")
    if xs is None:
        return [_out(_dtype(x), None if perm is None else [None] * len(perm))]
    perm = list(range(len(xs)))[::-1] if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(len(xs))):
        _fail(node, f"perm {perm} is not a permutation of the axes of {_fmt(xs)}")
    return [_out(_dtype(x), [xs[p] for p in perm])]


@infers("Concat")
def _concat(node: Node, ctx: InferContext) -> list:
    ins = [v for v in node.inputs if v is not None]
    shapes = [_shape(v) for v in ins]
    known = [s for s in shapes if s is not None]
    dt = next((d for d in map(_dtype, ins) if d is not None), None)
    if not known:
        return [_out(dt, None)]
    rank = len(known[0])
    if any(len(s) != rank for s in known):
        _fail(node, f"inputs have different ranks: {', '.join(_fmt(s) for s in known)}")
    axis = _axis(node, int(node.attrs.get("axis", 0)), rank)
    out: list[TypeDim] = []
    for i in range(rank):
        if i == axis:
            out.append(None if len(known) < len(shapes) else functools.reduce(
                lambda a, b: None if a is None or b is None else add(a, b), (s[i] for s in known)))
        else:
            d = None
            for s in known:
                d = _unify(node, d, s[i], f"dim {i} of inputs {', '.join(_fmt(s) for s in known)} differs")
            out.append(d)
    return [_out(dt, out)]


@infers("Split")
def _split(node: Node, ctx: InferContext) -> list:
    x, n = node.inputs[0], len(node.outputs)
    dt, xs = _dtype(x), _shape(x)
    if xs is None:
        return [_out(dt, None)] * n
    axis = _axis(node, int(_attr(node, ctx, "axis", 0)), len(xs))
    d = xs[axis]
    sizes = _moved(node, ctx, 1, "split", 13)
    num_outputs = node.attrs.get("num_outputs")
    if sizes is None:
        parts: list[TypeDim] = [None] * n
    elif sizes is not _ABSENT and len(sizes) > 0:
        if len(sizes) != n:
            _fail(node, f"split {sizes} gives {len(sizes)} parts for {n} outputs")
        if d is not None and equal(sum(sizes), d) is False:
            _fail(node, f"split {sizes} does not sum to dim {axis} of {_fmt(xs)}")
        parts = list(sizes)
    elif num_outputs is not None:
        k = int(num_outputs)
        if k != n:
            _fail(node, f"num_outputs={k} but the node has {n} outputs")
        chunk = _ceil_div(d, k)  # the last chunk takes the remainder
        last = None if chunk is None else sub(d, mul(chunk, k - 1))
        # A negative remainder (5 into 4) fails only when run; ONNX function bodies
        # (AffineGrid) hold such Splits in untaken If branches, so it is not an error here.
        parts = [chunk] * (k - 1) + [None if _le(last, -1) else last]
    else:
        q = _exact_div(d, n)
        if q is False:
            _fail(node, f"dim {axis} of {_fmt(xs)} does not split evenly into {n} outputs")
        parts = [q] * n
    return [_out(dt, xs[:axis] + (p,) + xs[axis + 1:]) for p in parts]


@infers("Squeeze")
def _squeeze(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    dt, xs = _dtype(x), _shape(x)
    axes = _moved(node, ctx, 1, "axes", 13)
    if xs is None:
        return [_out(dt, None)]
    if axes is None:
        n = _static_len(_input(node, 1))
        return [_out(dt, None if n is None else [None] * (len(xs) - n))]
    if axes is _ABSENT or not axes:
        # Without axes every 1 goes: a dim that may be 1 makes the rank unknown.
        if any(d is None or (d != 1 and not _ge2(d) and d != 0) for d in xs):
            return [_out(dt, None)]
        return [_out(dt, [d for d in xs if d != 1])]
    axes = _axes(node, axes, len(xs))
    for a in axes:
        if xs[a] is not None and equal(xs[a], 1) is False:
            _fail(node, f"cannot squeeze dim {a} of {_fmt(xs)}: it is {xs[a]}, not 1")
    return [_out(dt, [d for i, d in enumerate(xs) if i not in axes])]


@infers("Unsqueeze")
def _unsqueeze(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    dt, xs = _dtype(x), _shape(x)
    axes = _moved(node, ctx, 1, "axes", 13)
    if axes is _ABSENT:
        _fail(node, "missing axes")
    if xs is None or axes is None:
        n = len(axes) if axes is not None else _static_len(_input(node, 1))
        return [_out(dt, None if xs is None or n is None else [None] * (len(xs) + n))]
    rank = len(xs) + len(axes)
    axes = _axes(node, axes, rank)
    rest = iter(xs)
    return [_out(dt, [1 if i in axes else next(rest) for i in range(rank)])]


@infers("Flatten")
def _flatten(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs = _shape(x)
    if xs is None:
        return [_out(_dtype(x), [None, None])]
    axis = int(_attr(node, ctx, "axis", 1))
    if not -len(xs) <= axis <= len(xs):
        _fail(node, f"axis {axis} is out of range for {_fmt(xs)}")
    axis = axis + len(xs) if axis < 0 else axis
    return [_out(_dtype(x), [_prod(xs[:axis]), _prod(xs[axis:])])]


@infers("Expand")
def _expand(node: Node, ctx: InferContext) -> list:
    x, shape_v = node.inputs
    xs, target = _shape(x), _known(ctx, shape_v)
    if target is None:
        n = _static_len(shape_v)
        rank = None if n is None or xs is None else max(n, len(xs))
        return [_out(_dtype(x), None if rank is None else [None] * rank)]
    return [_out(_dtype(x), _broadcast(node, [xs, tuple(target)]))]


@infers("Tile")
def _tile(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs, reps = _shape(x), _known(ctx, node.inputs[1])
    if xs is None:
        return [_out(_dtype(x), None)]
    if reps is None:
        return [_out(_dtype(x), [None] * len(xs))]
    if len(reps) != len(xs):
        _fail(node, f"repeats {reps} do not match the rank of {_fmt(xs)}")
    return [_out(_dtype(x), [None if d is None or r is None else mul(d, r) for d, r in zip(xs, reps)])]


@infers("Pad")
def _pad(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs = _shape(x)
    if xs is None:
        return [_out(_dtype(x), None)]
    pads = _moved(node, ctx, 1, "pads", 11)
    axes = _moved(node, ctx, 3, "axes", 18)
    if axes is _ABSENT:
        axes = list(range(len(xs)))
    if pads is None or pads is _ABSENT or axes is None:
        return [_out(_dtype(x), [None] * len(xs))]
    axes = _axes(node, axes, len(xs))
    if len(pads) != 2 * len(axes):
        _fail(node, f"pads {pads} need 2 entries per padded axis of {_fmt(xs)}")
    out = list(xs)
    for i, a in enumerate(axes):
        if out[a] is not None:
            out[a] = add(add(out[a], pads[i]), pads[i + len(axes)])
            if _le(out[a], -1):
                _fail(node, f"pads {pads} make dim {a} of {_fmt(xs)} negative")
    return [_out(_dtype(x), out)]


def _slice_bound(i, d, lo, hi):
    """An index of Slice after ONNX wrapping and clamping; None where unprovable."""
    if i is None:
        return None
    if isinstance(i, int) and abs(i) >= _BIG and isinstance(d, SymExpr):
        return hi if i > 0 else lo       # INT64_MAX / INT64_MIN sentinels
    if _le(i, -1):
        i = add(i, d)
    elif not _le(0, i):
        return None
    return _clamp(i, lo, hi)


def _slice_dim(node: Node, d, start, end, step):
    if step == 0:
        _fail(node, "step 0 in Slice")
    if d is None or not isinstance(step, int):
        return None
    if d == 0:
        return 0
    if step > 0:
        s = _slice_bound(start, d, 0, d)
        e = _slice_bound(end, d, 0, d)
    else:
        s = _slice_bound(start, d, 0, sub(d, 1))
        e = _slice_bound(end, d, -1, sub(d, 1))
    if s is None or e is None:
        return None
    return _max0(_ceil_div(sub(e, s), step))


@infers("Slice")
def _slice(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs = _shape(x)
    if xs is None:
        return [_out(_dtype(x), None)]
    if ctx.opset < 10 and "starts" in node.attrs:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes, steps = node.attrs.get("axes"), None
    else:
        starts, ends = _known(ctx, node.inputs[1]), _known(ctx, node.inputs[2])
        a, s = _input(node, 3), _input(node, 4)
        axes = None if a is None else _known_ints(ctx, a)
        steps = None if s is None else _known(ctx, s)
        if a is not None and axes is None:
            axes = _ABSENT     # given but unknown
        if s is not None and steps is None:
            steps = _ABSENT
    if axes is _ABSENT:        # any axis may change
        return [_out(_dtype(x), [None] * len(xs))]
    n = len(starts) if starts is not None else len(ends) if ends is not None else None
    if axes is None:
        axes = list(range(n if n is not None else len(xs)))
    axes = _axes(node, axes, len(xs))
    out = list(xs)
    if starts is None or ends is None or steps is _ABSENT:
        for a in axes:
            out[a] = None
        return [_out(_dtype(x), out)]
    steps = steps or [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        _fail(node, f"starts {starts}, ends {ends}, axes {axes}, steps {steps} differ in length")
    for a, st, en, sp in zip(axes, starts, ends, steps):
        out[a] = _slice_dim(node, xs[a], st, en, sp)
    return [_out(_dtype(x), out)]


@infers("DepthToSpace", "SpaceToDepth")
def _depth_space(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs = _shape(x)
    if xs is None:
        return [_out(_dtype(x), [None] * 4)]
    if len(xs) != 4:
        _fail(node, f"input {_fmt(xs)} is not 4-D")
    b = int(node.attrs["blocksize"])
    n, c, h, w = xs
    if node.op_type == "DepthToSpace":
        q = _exact_div(c, b * b)
        if q is False:
            _fail(node, f"channels {c} are not a multiple of blocksize^2 = {b * b}")
        out = [n, q, None if h is None else mul(h, b), None if w is None else mul(w, b)]
    else:
        qh, qw = _exact_div(h, b), _exact_div(w, b)
        if qh is False or qw is False:
            _fail(node, f"spatial dims {h}, {w} are not multiples of blocksize {b}")
        out = [n, None if c is None else mul(c, b * b), qh, qw]
    return [_out(_dtype(x), out)]


# ======================================================================================
# Indexing and selection
# ======================================================================================

@infers("Gather")
def _gather(node: Node, ctx: InferContext) -> list:
    data, idx = node.inputs
    ds, ids = _shape(data), _shape(idx)
    if ds is None or ids is None:
        return [_out(_dtype(data), None)]
    axis = _axis(node, int(_attr(node, ctx, "axis", 0)), len(ds))
    return [_out(_dtype(data), ds[:axis] + ids + ds[axis + 1:])]


@infers("GatherElements")
def _gather_elements(node: Node, ctx: InferContext) -> list:
    return [_out(_dtype(node.inputs[0]), _shape(node.inputs[1]))]


@infers("GatherND")
def _gather_nd(node: Node, ctx: InferContext) -> list:
    data, idx = node.inputs
    ds, ids = _shape(data), _shape(idx)
    b = int(_attr(node, ctx, "batch_dims", 0))
    if ds is None or ids is None or not ids or not isinstance(ids[-1], int):
        return [_out(_dtype(data), None)]
    if b + ids[-1] > len(ds):
        _fail(node, f"indices {_fmt(ids)} index past the rank of data {_fmt(ds)}")
    return [_out(_dtype(data), ids[:-1] + ds[b + ids[-1]:])]


@infers("Compress")
def _compress(node: Node, ctx: InferContext) -> list:
    """The kept count is data-dependent unless the condition is a constant."""
    x, cond = node.inputs
    xs, axis = _shape(x), node.attrs.get("axis")
    c = _known(ctx, cond)
    if axis is None:
        n = None
        if c is not None and xs is not None and isinstance(_prod(xs), int):
            n = int(np.count_nonzero(c[: _prod(xs)]))
        return [_out(_dtype(x), [n])]
    if xs is None:
        return [_out(_dtype(x), None)]
    axis = _axis(node, int(axis), len(xs))
    n = int(np.count_nonzero(c[: xs[axis]])) if c is not None and isinstance(xs[axis], int) else None
    return [_out(_dtype(x), xs[:axis] + (n,) + xs[axis + 1:])]


@infers("NonZero")
def _nonzero(node: Node, ctx: InferContext) -> list:
    xs = _shape(node.inputs[0])
    return [_out(I64, [None if xs is None else len(xs), None])]


@infers("Unique")
def _unique(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs, axis = _shape(x), node.attrs.get("axis")
    if axis is None:
        y, inverse = [None], [_prod(xs) if xs is not None else None]
    elif xs is None:
        y, inverse = None, [None]
    else:
        a = _axis(node, int(axis), len(xs))
        y, inverse = list(xs[:a]) + [None] + list(xs[a + 1:]), [xs[a]]
    types = [_out(_dtype(x), y), _out(I64, [None]), _out(I64, inverse), _out(I64, [None])]
    return types[: len(node.outputs)]


@infers("TopK")
def _topk(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs = _shape(x)
    if ctx.opset < 10 and "k" in node.attrs:
        k = int(node.attrs["k"])
    else:
        kv = _known(ctx, node.inputs[1])
        k = kv[0] if kv and len(kv) == 1 else None
    out = None
    if xs is not None:
        axis = _axis(node, int(_attr(node, ctx, "axis", -1)), len(xs))
        if k is not None and xs[axis] is not None and _le(add(xs[axis], 1), k):
            _fail(node, f"k = {k} exceeds dim {axis} of {_fmt(xs)}")
        out = xs[:axis] + (k,) + xs[axis + 1:]
    return [_out(_dtype(x), out), _out(I64, out)][: len(node.outputs)]


@infers("OneHot")
def _one_hot(node: Node, ctx: InferContext) -> list:
    idx, depth_v, values = node.inputs
    ids = _shape(idx)
    if ids is None:
        return [_out(_dtype(values), None)]
    dv = _known(ctx, depth_v)
    depth = None
    if dv is not None and len(dv) == 1:
        depth = int(dv[0]) if isinstance(dv[0], (int, float)) else dv[0]
    axis = _axis(node, int(_attr(node, ctx, "axis", -1)), len(ids) + 1)
    return [_out(_dtype(values), ids[:axis] + (depth,) + ids[axis:])]


# ======================================================================================
# Shapes, sizes and constants as values
# ======================================================================================

@infers("Shape")
def _shape_op(node: Node, ctx: InferContext) -> list:
    xs = _shape(node.inputs[0])
    if xs is None:
        return [_out(I64, [None])]
    r = len(xs)
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    end = r if end is None else int(end)
    start, end = (min(max(v + r if v < 0 else v, 0), r) for v in (start, end))
    return [_out(I64, [max(end - start, 0)])]


@infers("Size")
def _size(node: Node, ctx: InferContext) -> list:
    return [_out(I64, ())]


@infers("ConstantOfShape")
def _constant_of_shape(node: Node, ctx: InferContext) -> list:
    value = node.attrs.get("value")
    dt = F32 if value is None else dtypes.from_numpy(np.asarray(value).dtype)
    dims = _known(ctx, node.inputs[0])
    if dims is None:
        n = _static_len(node.inputs[0])
        return [_out(dt, None if n is None else [None] * n)]
    if any(isinstance(d, int) and d < 0 for d in dims):
        _fail(node, f"shape {dims} has a negative dim")
    return [_out(dt, dims)]


@infers("Range")
def _range(node: Node, ctx: InferContext) -> list:
    """max(ceil((limit - start) / delta), 0), exact for symbolic start/limit and int delta."""
    start, limit, delta = (_known(ctx, v) for v in node.inputs)
    dt = _dtype(node.inputs[0])
    n = None
    if start is not None and limit is not None and delta is not None:
        (s,), (l,), (d,) = start, limit, delta
        if d == 0:
            _fail(node, "delta is 0")
        if isinstance(s, float) or isinstance(l, float) or isinstance(d, float):
            if not isinstance(s, SymExpr) and not isinstance(l, SymExpr):
                n = max(math.ceil((l - s) / d), 0)
        elif isinstance(d, int):
            n = _max0(_ceil_div(sub(l, s), d))
    return [_out(dt, [n])]


@infers("Constant")
def _constant(node: Node, ctx: InferContext) -> list:
    a = node.attrs
    if "value" in a:
        arr = np.asarray(a["value"])
        return [_out(dtypes.from_numpy(arr.dtype), arr.shape)]
    for key, dt, is_list in (("value_float", F32, False), ("value_floats", F32, True),
                             ("value_int", I64, False), ("value_ints", I64, True),
                             ("value_string", dtypes.from_name("str"), False),
                             ("value_strings", dtypes.from_name("str"), True)):
        if key in a:
            return [_out(dt, [len(a[key])] if is_list else [])]
    return [TensorType(None, None)]  # sparse_value: not modelled


@infers("EyeLike")
def _eye_like(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    dt = _to_dtype(node, node.attrs["dtype"]) if "dtype" in node.attrs else _dtype(x)
    return [_out(dt, _shape(x))]


# ======================================================================================
# Linear algebra
# ======================================================================================

def _matmul_shape(node: Node, a: Shape, b: Shape) -> Shape:
    if a is None or b is None:
        return None
    if not a or not b:
        _fail(node, f"MatMul operands {_fmt(a)} and {_fmt(b)} must not be scalars")
    a1, b1 = len(a) == 1, len(b) == 1
    a2 = (1,) + a if a1 else a
    b2 = b + (1,) if b1 else b
    if a2[-1] is not None and b2[-2] is not None and equal(a2[-1], b2[-2]) is False:
        _fail(node, f"inner dims differ: {_fmt(a)} @ {_fmt(b)}")
    batch = _broadcast(node, [a2[:-2], b2[:-2]])
    return batch + (() if a1 else (a2[-2],)) + (() if b1 else (b2[-1],))


@infers("MatMul")
def _matmul(node: Node, ctx: InferContext) -> list:
    a, b = node.inputs
    return [_out(_dtype(a), _matmul_shape(node, _shape(a), _shape(b)))]


@infers("MatMulInteger")
def _matmul_integer(node: Node, ctx: InferContext) -> list:
    return [_out(I32, _matmul_shape(node, _shape(node.inputs[0]), _shape(node.inputs[1])))]


@infers("Gemm")
def _gemm(node: Node, ctx: InferContext) -> list:
    a, b = node.inputs[0], node.inputs[1]
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None:
        return [_out(_dtype(a), [None, None])]
    if len(sa) != 2 or len(sb) != 2:
        _fail(node, f"operands {_fmt(sa)} and {_fmt(sb)} are not 2-D")
    (m, ka) = sa[::-1] if node.attrs.get("transA", 0) else sa
    (kb, n) = sb[::-1] if node.attrs.get("transB", 0) else sb
    _unify(node, ka, kb, f"inner dims of {_fmt(sa)} and {_fmt(sb)} differ")
    return [_out(_dtype(a), [m, n])]


@infers("Einsum")
def _einsum(node: Node, ctx: InferContext) -> list:
    eq = str(node.attrs.get("equation", "")).replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    dt = _dtype(node.inputs[0])
    if len(terms) != len(node.inputs):
        _fail(node, f"equation {eq!r} has {len(terms)} operands for {len(node.inputs)} inputs")
    shapes = [_shape(v) for v in node.inputs]
    if any(s is None for s in shapes):
        return [_out(dt, None)]
    labels: dict[str, TypeDim] = {}
    counts: dict[str, int] = {}
    ell: Shape = ()
    for term, s in zip(terms, shapes):
        pre, dots, post = term.partition("...")
        n_ell = len(s) - len(pre) - len(post)
        if n_ell < 0 or (not dots and n_ell):
            _fail(node, f"operand {term!r} of {eq!r} does not match shape {_fmt(s)}")
        if dots:
            ell = _broadcast(node, [ell, s[len(pre):len(pre) + n_ell]])
        for ch, d in zip(pre + post, s[:len(pre)] + s[len(s) - len(post):]):
            labels[ch] = _bcast_dim(node, labels[ch], d) if ch in labels else d
            counts[ch] = counts.get(ch, 0) + 1
    if not arrow:
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c, k in counts.items() if k == 1))
    pre, dots, post = rhs.partition("...")
    if any(c not in labels for c in pre + post):
        _fail(node, f"output of {eq!r} uses a label no operand has")
    return [_out(dt, [labels[c] for c in pre] + (list(ell) if dots else []) + [labels[c] for c in post])]


@infers("Det")
def _det(node: Node, ctx: InferContext) -> list:
    xs = _shape(node.inputs[0])
    return [_out(_dtype(node.inputs[0]), None if xs is None else xs[:-2])]


# ======================================================================================
# Reductions
# ======================================================================================

_REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@infers(*_REDUCE)
def _reduce(node: Node, ctx: InferContext) -> list:
    """Axes are an input from opset 13 (ReduceSum) or 18 (the others), an attribute before."""
    x = node.inputs[0]
    dt, xs = _dtype(x), _shape(x)
    axes = _moved(node, ctx, 1, "axes", 13 if node.op_type == "ReduceSum" else 18)
    keep = bool(_attr(node, ctx, "keepdims", 1))
    if xs is None:
        return [_out(dt, None)]
    if axes is None:
        n = _static_len(_input(node, 1))
        if keep:
            return [_out(dt, [None] * len(xs))]
        return [_out(dt, None if not n else [None] * (len(xs) - n))]
    if axes is _ABSENT or not axes:
        if _attr(node, ctx, "noop_with_empty_axes", 0):
            return [_out(dt, xs)]
        axes = range(len(xs))
    axes = _axes(node, list(axes), len(xs))
    return [_out(dt, [1 if i in axes else d for i, d in enumerate(xs) if keep or i not in axes])]


@infers("ArgMax", "ArgMin")
def _arg_reduce(node: Node, ctx: InferContext) -> list:
    xs = _shape(node.inputs[0])
    if xs is None:
        return [_out(I64, None)]
    axis = _axis(node, int(_attr(node, ctx, "axis", 0)), len(xs))
    keep = bool(_attr(node, ctx, "keepdims", 1))
    return [_out(I64, [1 if i == axis else d for i, d in enumerate(xs) if keep or i != axis])]


# ======================================================================================
# Normalisation and attention
# ======================================================================================

@infers("LayerNormalization")
def _layer_norm(node: Node, ctx: InferContext) -> list:
    """Mean and InvStdDev keep X's rank with the normalised dims set to 1, in stash_type."""
    x = node.inputs[0]
    xs = _shape(x)
    stash = _to_dtype(node, _attr(node, ctx, "stash_type", 1))
    stats = None
    if xs is not None:
        axis = _axis(node, int(_attr(node, ctx, "axis", -1)), len(xs))
        stats = xs[:axis] + (1,) * (len(xs) - axis)
    return [x.type, _out(stash, stats), _out(stash, stats)][: len(node.outputs)]


@infers("RMSNormalization")
def _rms_norm(node: Node, ctx: InferContext) -> list:
    x, scale = node.inputs[0], node.inputs[1]
    return [_out(_dtype(scale) or _dtype(x), _shape(x))]


@infers("BatchNormalization")
def _batch_norm(node: Node, ctx: InferContext) -> list:
    """Y is X; the optional (training) outputs are per-channel like input_mean."""
    x, mean = node.inputs[0], _input(node, 3)
    xs = _shape(x)
    stat = _out(_dtype(mean), [None if xs is None or len(xs) < 2 else xs[1]])
    return [x.type] + [stat] * (len(node.outputs) - 1)


@infers("Attention")
def _attention(node: Node, ctx: InferContext) -> list:
    """Opset-23 Attention: Y, present_key/value (past + new along seq), qk_matmul_output."""
    q, k, v = node.inputs[:3]
    past_k = _input(node, 4)
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    outs: list[TensorType] = []
    if qs is None or ks is None or vs is None:
        unknown = [_out(_dtype(q), None), _out(_dtype(k), None), _out(_dtype(v), None), _out(_dtype(q), None)]
        return unknown[: len(node.outputs)]
    if not len(qs) == len(ks) == len(vs) or len(qs) not in (3, 4):
        _fail(node, f"Q {_fmt(qs)}, K {_fmt(ks)}, V {_fmt(vs)} must all be 3-D or all 4-D")
    batch = _unify(node, _unify(node, qs[0], ks[0], "batch of Q and K"), vs[0], "batch of Q and V")
    if len(qs) == 4:
        hq, sq, dh = qs[1], qs[2], qs[3]
        hkv, skv, dv = _unify(node, ks[1], vs[1], "heads of K and V"), ks[2], vs[3]
        _unify(node, qs[3], ks[3], "head size of Q and K")
    else:
        hq, hkv = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
        if hq is None or hkv is None:
            _fail(node, "3-D inputs need q_num_heads and kv_num_heads")
        hq, hkv, sq, skv = int(hq), int(hkv), qs[1], ks[1]
        dh, dv = _exact_div(ks[2], hkv), _exact_div(vs[2], hkv)
        if dh is False or dv is False:
            _fail(node, f"K {_fmt(ks)} / V {_fmt(vs)} hidden sizes are not multiples of kv_num_heads={hkv}")
    ps = _shape(past_k)
    total = skv if past_k is None else (None if ps is None or len(ps) != 4 or skv is None or ps[2] is None
                                        else add(ps[2], skv))
    y = [batch, hq, sq, dv] if len(qs) == 4 else [batch, sq, None if dv is None else mul(hq, dv)]
    outs = [_out(_dtype(q), y),
            _out(_dtype(k), [batch, hkv, total, dh]),
            _out(_dtype(v), [batch, hkv, total, dv]),
            _out(_dtype(q), [batch, hq, sq, total])]
    return outs[: len(node.outputs)]


# ======================================================================================
# Convolution, pooling, resizing: spatial dims are static or None
# ======================================================================================

def _spatial(node: Node, ctx: InferContext, xs: Shape, kernel: Sequence, *, transpose=False) -> list:
    """Output spatial dims from the auto_pad/pads/strides/dilations/ceil_mode attributes."""
    n = len(kernel)
    strides = list(_attr(node, ctx, "strides") or [1] * n)
    dil = list(_attr(node, ctx, "dilations") or [1] * n)
    pads = list(_attr(node, ctx, "pads") or [0] * (2 * n))
    auto_pad = _attr(node, ctx, "auto_pad", "NOTSET")
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    out_pad = list(node.attrs.get("output_padding") or [0] * n)
    out = []
    for i in range(n):
        d, k = xs[2 + i], kernel[i]
        if not isinstance(d, int) or not isinstance(k, int):
            out.append(None)
            continue
        eff_k = (k - 1) * dil[i] + 1
        if transpose:
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out.append(d * strides[i])
            else:
                p = 0 if auto_pad == "VALID" else pads[i] + pads[i + n]
                out.append(strides[i] * (d - 1) + out_pad[i] + eff_k - p)
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-d // strides[i]))
        else:
            p0, p1 = (0, 0) if auto_pad == "VALID" else (pads[i], pads[i + n])
            span = d + p0 + p1 - eff_k
            if span < 0:
                _fail(node, f"kernel {k} (dilation {dil[i]}) is larger than padded input dim {d + p0 + p1}")
            o = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
            if ceil_mode and (o - 1) * strides[i] >= d + p0:
                o -= 1  # the last window must start inside the input or left padding
            out.append(o)
    return out


@infers("Conv", "ConvInteger")
def _conv(node: Node, ctx: InferContext) -> list:
    x, w = node.inputs[0], node.inputs[1]
    xs, ws = _shape(x), _shape(w)
    dt = I32 if node.op_type == "ConvInteger" else _dtype(x)
    if xs is None or ws is None:
        return [_out(dt, None if xs is None else [None] * len(xs))]
    kernel = list(node.attrs.get("kernel_shape") or ws[2:])
    group = int(node.attrs.get("group", 1))
    if xs[1] is not None and ws[1] is not None and equal(xs[1], mul(ws[1], group)) is False:
        _fail(node, f"input channels {xs[1]} != weight {_fmt(ws)} channels x group {group}")
    return [_out(dt, [xs[0], ws[0]] + _spatial(node, ctx, xs, kernel))]


@infers("ConvTranspose")
def _conv_transpose(node: Node, ctx: InferContext) -> list:
    x, w = node.inputs[0], node.inputs[1]
    xs, ws = _shape(x), _shape(w)
    if xs is None or ws is None:
        return [_out(_dtype(x), None if xs is None else [None] * len(xs))]
    group = int(node.attrs.get("group", 1))
    channels = None if ws[1] is None else mul(ws[1], group)
    if node.attrs.get("output_shape"):
        spatial = list(node.attrs["output_shape"])[-(len(xs) - 2):]
    else:
        spatial = _spatial(node, ctx, xs, list(node.attrs.get("kernel_shape") or ws[2:]), transpose=True)
    return [_out(_dtype(x), [xs[0], channels] + spatial)]


@infers("MaxPool", "AveragePool", "LpPool")
def _pool(node: Node, ctx: InferContext) -> list:
    x = node.inputs[0]
    xs = _shape(x)
    out = None
    if xs is not None:
        if "kernel_shape" not in node.attrs:
            _fail(node, "missing kernel_shape")
        out = list(xs[:2]) + _spatial(node, ctx, xs, list(node.attrs["kernel_shape"]))
    return [_out(_dtype(x), out), _out(I64, out)][: len(node.outputs)]


@infers("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(node: Node, ctx: InferContext) -> list:
    xs = _shape(node.inputs[0])
    return [_out(_dtype(node.inputs[0]), None if xs is None else list(xs[:2]) + [1] * (len(xs) - 2))]


@infers("Resize")
def _resize(node: Node, ctx: InferContext) -> list:
    """sizes are taken as given; scales give floor(dim * scale), exact for integral scales."""
    x = node.inputs[0]
    xs = _shape(x)
    if xs is None:
        return [_out(_dtype(x), None)]
    r = len(xs)
    modern = ctx.opset >= 11  # opset 10: (X, scales); 11+: (X, roi, scales, sizes)
    scales = _known(ctx, _input(node, 2 if modern else 1))
    sizes = _known(ctx, _input(node, 3)) if modern else None
    axes = _axes(node, list(node.attrs.get("axes") or range(r)), r)
    out: list[TypeDim] = list(xs)
    if sizes:
        if len(sizes) != len(axes):
            _fail(node, f"sizes {sizes} do not match axes {axes}")
        policy = _attr(node, ctx, "keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for a, s in zip(axes, sizes):
                out[a] = s
            return [_out(_dtype(x), out)]
        if not all(isinstance(xs[a], int) and isinstance(s, int) for a, s in zip(axes, sizes)):
            return [_out(_dtype(x), [d if i not in axes else None for i, d in enumerate(xs)])]
        ratios = [s / xs[a] for a, s in zip(axes, sizes)]
        scale = min(ratios) if policy == "not_larger" else max(ratios)
        for a in axes:
            out[a] = int(scale * xs[a] + 0.5)
        return [_out(_dtype(x), out)]
    if not scales or _attr(node, ctx, "coordinate_transformation_mode", "") == "tf_crop_and_resize":
        return [_out(_dtype(x), [None] * r)]
    if len(scales) != len(axes):
        _fail(node, f"scales {scales} do not match axes {axes}")
    for a, s in zip(axes, scales):
        d = xs[a]
        if isinstance(d, int):
            out[a] = int(math.floor(d * s))
        elif d is not None and float(s).is_integer():
            out[a] = mul(d, int(s))
        else:
            out[a] = None
    return [_out(_dtype(x), out)]


# ======================================================================================
# Quantisation
# ======================================================================================

@infers("QuantizeLinear")
def _quantize(node: Node, ctx: InferContext) -> list:
    code = node.attrs.get("output_dtype", 0)
    zp = _input(node, 2)
    dt = _to_dtype(node, code) if code else (_dtype(zp) if zp is not None else dtypes.from_name("u8"))
    return [_out(dt, _shape(node.inputs[0]))]


@infers("DequantizeLinear")
def _dequantize(node: Node, ctx: InferContext) -> list:
    code = node.attrs.get("output_dtype", 0)
    dt = _to_dtype(node, code) if code else _dtype(node.inputs[1])
    return [_out(dt, _shape(node.inputs[0]))]

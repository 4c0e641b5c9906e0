"""Elementwise ONNX ops: unary math, activations, binary bitwise/logical, variadic Sum/Mean, Clip, CastLike."""
from __future__ import annotations

import math

from . import ANY, FLOAT, FLOAT_BF, INT, NUMERIC, SIGNED, UNSIGNED, lowers


def const(lw, value, like):
    """A scalar constant of `like`'s element type."""
    return lw.relax.const(value, like.ty.dtype)


def _x(lw, node, i=0):
    return lw.get(node.inputs[i])


def _attr(node, name, default):
    return float(node.attrs.get(name, default))


_FLOAT_UNARY = {"Log": "log", "Ceil": "ceil", "Floor": "floor", "Round": "round", "Acos": "acos",
                "Acosh": "acosh", "Asin": "asin", "Asinh": "asinh", "Atan": "atan", "Atanh": "atanh",
                "Cosh": "cosh", "Sinh": "sinh", "Tan": "tan"}


def _float_unary(op_name):
    @lowers(op_name, dtypes=FLOAT)
    def lower(lw, node):
        return lw.emit(getattr(lw.relax.op, _FLOAT_UNARY[op_name])(_x(lw, node)))
    return lower


for _name in _FLOAT_UNARY:
    _float_unary(_name)


@lowers("Abs", dtypes=NUMERIC)
def abs_(lw, node):
    x = _x(lw, node)
    if str(node.inputs[0].dtype) in UNSIGNED:
        return x
    return lw.emit(lw.relax.op.abs(x))


@lowers("Sign", dtypes=NUMERIC)
def sign(lw, node):
    return lw.emit(lw.relax.op.sign(_x(lw, node)))


@lowers("IsNaN", dtypes=FLOAT)
def isnan(lw, node):
    return lw.emit(lw.relax.op.isnan(_x(lw, node)))


@lowers("IsInf", dtypes=FLOAT)
def isinf(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    pos, neg = node.attrs.get("detect_positive", 1), node.attrs.get("detect_negative", 1)
    inf = op.isinf(x)
    if pos and neg:
        return lw.emit(inf)
    if not pos and not neg:
        return lw.emit(op.zeros_like(inf))
    side = op.greater(x, const(lw, 0, x)) if pos else op.less(x, const(lw, 0, x))
    return lw.emit(op.logical_and(inf, side))


# ---- activations (float only: ONNX defines them on float tensors) ---------------------------
def _where_neg(lw, x, neg, pos):
    op = lw.relax.op
    return lw.emit(op.where(op.less(x, const(lw, 0, x)), neg, pos))


@lowers("LeakyRelu", dtypes=FLOAT)
def leaky_relu(lw, node):
    x = _x(lw, node)
    return _where_neg(lw, x, lw.relax.op.multiply(x, const(lw, _attr(node, "alpha", 0.01), x)), x)


@lowers("PRelu", dtypes=FLOAT)
def prelu(lw, node):
    x, slope = _x(lw, node), _x(lw, node, 1)
    return _where_neg(lw, x, lw.relax.op.multiply(x, slope), x)


@lowers("Elu", dtypes=FLOAT)
def elu(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    alpha = _attr(node, "alpha", 1.0)
    return _where_neg(lw, x, op.multiply(const(lw, alpha, x), op.subtract(op.exp(x), const(lw, 1, x))), x)


@lowers("Celu", dtypes=FLOAT)
def celu(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    a = const(lw, _attr(node, "alpha", 1.0), x)
    neg = op.multiply(a, op.subtract(op.exp(op.divide(x, a)), const(lw, 1, x)))
    return lw.emit(op.add(op.maximum(x, const(lw, 0, x)), op.minimum(const(lw, 0, x), neg)))


@lowers("Selu", dtypes=FLOAT)
def selu(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    alpha = const(lw, _attr(node, "alpha", 1.67326319217681884765625), x)
    gamma = const(lw, _attr(node, "gamma", 1.05070102214813232421875), x)
    neg = op.multiply(alpha, op.subtract(op.exp(x), const(lw, 1, x)))
    return lw.emit(op.multiply(gamma, op.where(op.greater(x, const(lw, 0, x)), x, neg)))


@lowers("ThresholdedRelu", dtypes=FLOAT)
def thresholded_relu(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    return lw.emit(op.where(op.greater(x, const(lw, _attr(node, "alpha", 1.0), x)), x, op.zeros_like(x)))


@lowers("HardSigmoid", dtypes=FLOAT)
def hard_sigmoid(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    y = op.add(op.multiply(x, const(lw, _attr(node, "alpha", 0.2), x)), const(lw, _attr(node, "beta", 0.5), x))
    return lw.emit(op.clip(y, 0.0, 1.0))


@lowers("HardSwish", dtypes=FLOAT)
def hard_swish(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    hs = op.clip(op.add(op.multiply(x, const(lw, 1 / 6, x)), const(lw, 0.5, x)), 0.0, 1.0)
    return lw.emit(op.multiply(x, hs))


def _softplus(lw, x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|))."""
    op = lw.relax.op
    return op.add(op.maximum(x, const(lw, 0, x)), op.log(op.add(const(lw, 1, x), op.exp(op.negative(op.abs(x))))))


@lowers("Softplus", dtypes=FLOAT)
def softplus(lw, node):
    return lw.emit(_softplus(lw, _x(lw, node)))


@lowers("Softsign", dtypes=FLOAT)
def softsign(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    return lw.emit(op.divide(x, op.add(const(lw, 1, x), op.abs(x))))


@lowers("Mish", dtypes=FLOAT)
def mish(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    return lw.emit(op.multiply(x, op.tanh(_softplus(lw, x))))


@lowers("Swish", dtypes=FLOAT)
def swish(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    return lw.emit(op.multiply(x, op.sigmoid(op.multiply(x, const(lw, _attr(node, "alpha", 1.0), x)))))


@lowers("Gelu", dtypes=FLOAT_BF)
def gelu(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    if node.attrs.get("approximate", "none") == "tanh":
        inner = op.multiply(const(lw, math.sqrt(2 / math.pi), x),
                            op.add(x, op.multiply(const(lw, 0.044715, x), op.power(x, const(lw, 3.0, x)))))
        return lw.emit(op.multiply(op.multiply(const(lw, 0.5, x), x), op.add(const(lw, 1, x), op.tanh(inner))))
    cdf = op.add(const(lw, 0.5, x), op.multiply(const(lw, 0.5, x), op.erf(op.multiply(x, const(lw, 1 / math.sqrt(2), x)))))
    return lw.emit(op.multiply(x, cdf))


@lowers("Shrink", dtypes=NUMERIC)
def shrink(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    lambd, bias = _attr(node, "lambd", 0.5), _attr(node, "bias", 0.0)
    lo = op.add(x, const(lw, bias, x))
    hi = op.subtract(x, const(lw, bias, x))
    y = op.where(op.less(x, const(lw, -lambd, x)), lo, op.where(op.greater(x, const(lw, lambd, x)), hi, op.zeros_like(x)))
    return lw.emit(y)


# ---- binary -------------------------------------------------------------------------------------
@lowers("Xor", dtypes=("bool",))
def xor(lw, node):
    return lw.emit(lw.relax.op.logical_xor(_x(lw, node), _x(lw, node, 1)))


@lowers("BitwiseAnd", "BitwiseOr", "BitwiseXor", dtypes=INT)
def bitwise(lw, node):
    fn = {"BitwiseAnd": "bitwise_and", "BitwiseOr": "bitwise_or", "BitwiseXor": "bitwise_xor"}[node.op_type]
    return lw.emit(getattr(lw.relax.op, fn)(_x(lw, node), _x(lw, node, 1)))


@lowers("BitwiseNot", dtypes=INT)
def bitwise_not(lw, node):
    return lw.emit(lw.relax.op.bitwise_not(_x(lw, node)))


@lowers("BitShift", dtypes=UNSIGNED)
def bit_shift(lw, node):
    fn = lw.relax.op.left_shift if node.attrs["direction"] == "LEFT" else lw.relax.op.right_shift
    return lw.emit(fn(_x(lw, node), _x(lw, node, 1)))


@lowers("Sum", "Mean", dtypes=NUMERIC)
def sum_mean(lw, node):
    op = lw.relax.op
    acc = _x(lw, node)
    for i in range(1, len(node.inputs)):
        acc = lw.emit(op.add(acc, _x(lw, node, i)))
    if node.op_type == "Mean":
        acc = lw.emit(op.divide(acc, const(lw, float(len(node.inputs)), acc)))
    return acc


@lowers("Clip", dtypes=NUMERIC)
def clip(lw, node):
    op, x = lw.relax.op, _x(lw, node)
    if len(node.inputs) == 1 and ("min" in node.attrs or "max" in node.attrs):   # Clip-1..6: attributes
        lo, hi = node.attrs.get("min"), node.attrs.get("max")
        bounds = [None if b is None else const(lw, float(b), x) for b in (lo, hi)]
    else:
        bounds = [_x(lw, node, i) if len(node.inputs) > i and node.inputs[i] is not None else None for i in (1, 2)]
    lo, hi = bounds
    y = x
    if lo is not None:
        y = lw.emit(op.maximum(y, lo))
    if hi is not None:
        y = lw.emit(op.minimum(y, hi))
    return y


@lowers("CastLike", dtypes=ANY + ("bf16",))
def cast_like(lw, node):
    return lw.emit(lw.relax.op.astype(_x(lw, node), lw.tvm_dtype(node.outputs[0].type)))

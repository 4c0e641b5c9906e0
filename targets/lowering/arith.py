"""Arithmetic, comparison, logic and the elementwise math the exporters emit most (Add ... Where).

Integer operands whose values are known while lowering (shape arithmetic) are computed on
those values (`lw.both`, `lw.pv_binary`), so shapes stay symbolic expressions, not tensors."""
from __future__ import annotations

import numpy as np

from . import FLOAT_BF, NUMERIC_BF, lowers


@lowers("Add", dtypes=NUMERIC_BF)
def add(lw, node):
    return lw.both(node, lw.relax.op.add, lambda x, y: x + y)


@lowers("Sub", dtypes=NUMERIC_BF)
def sub(lw, node):
    return lw.both(node, lw.relax.op.subtract, lambda x, y: x - y)


@lowers("Mul", dtypes=NUMERIC_BF)
def mul(lw, node):
    return lw.both(node, lw.relax.op.multiply, lambda x, y: x * y)


@lowers("Div", dtypes=NUMERIC_BF)
def div(lw, node):
    if node.outputs[0].dtype is not None and node.outputs[0].dtype.is_integer:
        r = lw.pv_binary(node, lambda x, y: lw.tirx.truncdiv(lw.prim(x), lw.prim(y)))
        if r is not None:
            return r
        return lw.emit(lw.relax.op.divide(lw.get(node.inputs[0]), lw.get(node.inputs[1])))
    return lw.both(node, lw.relax.op.divide)


@lowers("Mod", dtypes=NUMERIC_BF)
def mod(lw, node):
    if node.attrs.get("fmod", 0):       # C fmod: the sign of the dividend (relax mod truncates)
        return lw.emit(lw.relax.op.mod(lw.get(node.inputs[0]), lw.get(node.inputs[1])))
    r = lw.pv_binary(node, lambda x, y: lw.tirx.floormod(lw.prim(x), lw.prim(y)))
    if r is not None:
        return r
    return lw.emit(lw.relax.op.floor_mod(lw.get(node.inputs[0]), lw.get(node.inputs[1])))


@lowers("Max", dtypes=NUMERIC_BF)
def maximum(lw, node):
    return variadic(lw, node, lw.relax.op.maximum, lambda x, y: lw.tirx.max(lw.prim(x), lw.prim(y)))


@lowers("Min", dtypes=NUMERIC_BF)
def minimum(lw, node):
    return variadic(lw, node, lw.relax.op.minimum, lambda x, y: lw.tirx.min(lw.prim(x), lw.prim(y)))


@lowers("Neg", dtypes=NUMERIC_BF)
def neg(lw, node):
    a = lw.known(node.inputs[0])
    if a is not None:
        return np.vectorize(lambda x: -x, otypes=[object])(a)
    return unary(lw, node, lw.relax.op.negative)


@lowers("Reciprocal", dtypes=NUMERIC_BF)
def reciprocal(lw, node):
    x = lw.get(node.inputs[0])
    return lw.emit(lw.relax.op.divide(lw.relax.const(1.0, x.ty.dtype), x))


@lowers("Relu", dtypes=NUMERIC_BF)
def relu(lw, node):
    x = lw.get(node.inputs[0])
    return lw.emit(lw.relax.op.nn.relu(x))


@lowers("Pow", dtypes=NUMERIC_BF)
def power(lw, node):
    x, y = (lw.get(v) for v in node.inputs)
    dt = x.ty.dtype
    if str(node.inputs[0].dtype) not in ("f16", "f32", "f64"):   # TVM's power is float only: exact in f64
        p = lw.relax.op.power(lw.relax.op.astype(x, "float64"), lw.relax.op.astype(y, "float64"))
        return lw.emit(lw.relax.op.astype(p, dt))
    return lw.emit(lw.relax.op.power(x, y if y.ty.dtype == dt else lw.relax.op.astype(y, dt)))


@lowers("Equal")
def equal(lw, node):
    op = lw.relax.op
    if str(node.inputs[0].dtype) == "bool":  # TVM's LLVM codegen emits a float compare for bool == bool
        return lw.both(node, lambda a, b: op.logical_not(op.logical_xor(a, b)))
    return lw.both(node, op.equal)


@lowers("Where")
def where(lw, node):
    c, a, b = (lw.get(v) for v in node.inputs)
    return lw.emit(lw.relax.op.where(c, a, b))


# One Relax op each: unary (float math, logical not) and binary (logic, comparisons: any operand type).
_UNARY = {"Sigmoid": ("sigmoid", FLOAT_BF), "Cos": ("cos", FLOAT_BF), "Sin": ("sin", FLOAT_BF),
          "Exp": ("exp", FLOAT_BF), "Sqrt": ("sqrt", FLOAT_BF), "Tanh": ("tanh", FLOAT_BF),
          "Erf": ("erf", FLOAT_BF), "Not": ("logical_not", ("bool",))}
_BINARY = {"And": ("logical_and", ("bool",)), "Or": ("logical_or", ("bool",)),
           "Greater": ("greater", None), "GreaterOrEqual": ("greater_equal", None), "Less": ("less", None),
           "LessOrEqual": ("less_equal", None)}


def _relax_op(name, binary):
    def lower(lw, node):
        fn = getattr(lw.relax.op, name)
        return lw.both(node, fn) if binary else unary(lw, node, fn)
    return lower


for _op, (_name, _dtypes) in _UNARY.items():
    lowers(_op, dtypes=_dtypes)(_relax_op(_name, False))
for _op, (_name, _dtypes) in _BINARY.items():
    lowers(_op, dtypes=_dtypes)(_relax_op(_name, True))


def variadic(lw, node, relax_fn, pv_fn):
    if len(node.inputs) == 2:
        return lw.both(node, relax_fn, pv_fn)
    acc = lw.get(node.inputs[0])
    for v in node.inputs[1:]:
        acc = lw.emit(relax_fn(acc, lw.get(v)))
    return acc


def unary(lw, node, fn):
    return lw.emit(fn(lw.get(node.inputs[0])))

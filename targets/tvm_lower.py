"""polyport IR (after the default pipeline) -> a TVM Relax IRModule with symbolic dims.

Every input symbol (`seq`, ...) becomes one `tirx.Var` ("int64"), so one build
serves every length. Standard ONNX ops map to `relax.op.*` (legalized by TVM);
the fused ops lower through `call_tir` (`BlockBuilder.emit_te`) to the TIR
kernels in `targets/kernels/cpu/`. Weights become function parameters (after
the graph inputs, in `params` order) so they are never baked into the library;
small constants become `relax.const`.

Int64 tensors that hold shapes (`polyport::ShapeValue`, shape arithmetic left
in the graph) are also tracked as lists of PrimExprs, so Reshape / Expand /
Slice / Range see their operands symbolically.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import numpy as np

from .. import errors
from ..ir.graph import Graph, Node, Value
from ..ir.symbolic import Atom, SymExpr
from ..ir.types import TensorType

# "cpu": hand-written, already scheduled cpu kernels; "portable": TE computes any target schedules
KERNEL_SETS = ("cpu", "portable")
# constants with more elements than this become parameters (bound from the artifact's weights)
SMALL_CONST = 64
INT64_BIG = 1 << 62


@dataclasses.dataclass
class Lowered:
    mod: Any                      # tvm.IRModule
    inputs: list[str]             # graph input names, in parameter order
    params: list[str]             # weight names, after the inputs
    outputs: list[str]
    symbols: list[str]
    packed: dict = dataclasses.field(default_factory=dict)   # weight name -> NB: bound as [N/NB, K, NB]
    packed_rows: dict = dataclasses.field(default_factory=dict)   # quantized operand -> NB: [N, X] as [N/NB, X, NB]
    origins: list = dataclasses.field(default_factory=list)   # (emitted Relax call, the node it lowers)


def _tvm():
    import tvm
    from tvm import relax, te, tirx, topi  # noqa: F401
    return tvm


def _dtype(t: TensorType, node: Optional[Node] = None) -> str:
    if t.dtype is None or t.dtype.numpy is None or t.dtype.name == "str":
        raise errors.UnsupportedOpError(f"cpu target: value of type {t} has no supported element type")
    return "bool" if t.dtype.name == "bool" else str(t.dtype.numpy)


class _Lowerer:
    def __init__(self, graph: Graph, target_name: str, kernels: str = "cpu", bb=None,
                 packing: Optional[dict[str, int]] = None):
        import tvm
        import tvm.sym  # noqa: F401 - the arithmetic analyzer (tvm.arith before 0.27)
        from tvm import relax, tirx
        self.analyzer = tvm.sym.Analyzer()
        self.tvm, self.relax, self.tirx = tvm, relax, tirx
        self.graph = graph
        self.target_name = target_name
        if kernels not in KERNEL_SETS:
            raise errors.PolyportError(f"unknown kernel set {kernels!r}; known: {', '.join(KERNEL_SETS)}")
        self.kernels = kernels
        self.syms: dict[str, Any] = {}
        self.node: Optional[Node] = None        # the node being lowered (None: inputs, outputs)
        self.origins: list = []                # (emitted Relax call, its node): names the node when TVM fails
        self.env: dict[Value, Any] = {}        # Value -> relax expr
        self.pv: dict[Value, np.ndarray] = {}  # Value -> object array of PrimExpr/int (int tensors only)
        self.bb = bb or relax.BlockBuilder()      # shared when several functions go into one module
        self.packing = packing                   # weight name -> NB agreed by all of them (None: decide here)

    # ---- symbolic helpers --------------------------------------------------------------
    def sym(self, name: str):
        if name not in self.syms:
            var = self.syms[name] = self.tirx.Var(name, "int64")
            # a symbol is a tensor extent (>= 1): lets the analyzer prove slice bounds non-negative
            self.analyzer.bind(var, self.tvm.ir.Range(1, 1 << 62))
        return self.syms[name]

    def dim(self, d):
        tirx = self.tirx
        if isinstance(d, int):
            return tirx.IntImm("int64", d)
        if isinstance(d, SymExpr):
            total = tirx.IntImm("int64", 0)
            for mono, coeff in d.terms.items():
                term = tirx.IntImm("int64", coeff)
                for s in mono:
                    term = term * (self.atom(s) if isinstance(s, Atom) else self.sym(s))
                total = total + term
            return self.simplify(total)
        raise errors.UnsupportedOpError(f"{self.target_name} target: unknown dim {d!r}")

    def atom(self, a: Atom):
        """`(x // k)`, `min(a, b)`, `max(a, b)` as the tirx expressions TVM's analyzer knows."""
        x, y = (self.dim(v) for v in a.args)
        return {"floordiv": self.tirx.floordiv, "min": self.tirx.min, "max": self.tirx.max}[a.kind](x, y)

    def simplify(self, e):
        if isinstance(e, int):
            return self.tirx.IntImm("int64", e)
        return self.analyzer.simplify(e)

    def shape(self, expr) -> list:
        sh = expr.ty.shape
        if sh is None or not hasattr(sh, "values"):
            raise errors.UnsupportedOpError(f"{self.target_name} target: a value of unknown shape ({expr.ty})")
        return list(sh.values)

    @staticmethod
    def as_int(e) -> Optional[int]:
        if isinstance(e, (int, np.integer)):
            return int(e)
        if hasattr(e, "value") and isinstance(getattr(e, "value"), int):
            return int(e.value)
        return None

    # ---- values --------------------------------------------------------------------------
    def emit(self, expr):
        var = self.bb.emit(expr)
        self.origins.append((self.bb.lookup_binding(var), self.node))
        return var

    def get(self, v: Value):
        if v in self.env:
            return self.env[v]
        if v in self.pv:
            e = self.materialise(self.pv[v], v)
            self.env[v] = e
            return e
        raise errors.UnsupportedOpError(f"{self.target_name} target: value {v.name} was not lowered")

    def materialise(self, arr: np.ndarray, v: Value):
        relax = self.relax
        dt = _dtype(v.type)
        if all(self.as_int(x) is not None for x in arr.flat):
            return relax.const(np.array([self.as_int(x) for x in arr.flat], dtype=dt).reshape(arr.shape), dt)
        flat = [self.simplify(x) if not isinstance(x, int) else x for x in arr.flat]
        t = self.emit(relax.op.shape_to_tensor(relax.ShapeExpr(flat)))
        if dt != "int64":
            t = self.emit(relax.op.astype(t, dt))
        if arr.shape != (len(flat),):
            t = self.emit(relax.op.reshape(t, list(arr.shape)))
        return t

    def known(self, v: Optional[Value]) -> Optional[np.ndarray]:
        if v is None:
            return None
        if v in self.pv:
            return self.pv[v]
        return None

    def ints(self, v: Value, what: str, node: Node) -> list:
        arr = self.known(v)
        if arr is None:
            raise self.unsupported(node, f"its {what} input is not a (symbolically) known shape tensor")
        return list(arr.flat)

    def unsupported(self, node: Node, why: str):
        return errors.UnsupportedOpError(
            f"node {node.name} ({node.qualified_op}): not supported by the {self.target_name} target: {why}")

    # ---- the function ----------------------------------------------------------------
    def lower(self, func_name: str = "main") -> Lowered:
        relax = self.relax
        g = self.graph
        inputs = []
        for v in g.inputs:
            t = v.type
            if not isinstance(t, TensorType) or t.shape is None or any(d is None for d in t.shape):
                raise errors.UnsupportedOpError(f"{self.target_name} target: input {v.name} has type {t}; "
                                                "inputs need a known rank and dims")
            rv = relax.Var(v.name, relax.TensorType(shape=[self.dim(d) for d in t.shape], dtype=_dtype(t)))
            inputs.append(rv)
            self.env[v] = rv
        params, param_vars = [], []
        self.packed: dict[str, int] = {}
        self.packed_rows: dict[str, int] = {}
        from .lowering import quant
        for name, v in g.constants.items():
            arr = v.const
            qnb = quant.param_layout(self, v)
            if qnb is not None:       # quantized weight operands: parameters, codes bound as stored or column-blocked
                shape = [arr.shape[0] // qnb, arr.shape[1], qnb] if qnb else list(arr.shape)
                if qnb:
                    self.packed_rows[name] = qnb
                rv = relax.Var(_safe(name), relax.TensorType(shape=shape, dtype=str(arr.dtype)))
                params.append(name)
                param_vars.append(rv)
                self.env[v] = rv
                continue
            if arr.dtype.kind in "iu" and arr.size <= 4096:
                self.pv[v] = np.array(arr.tolist(), dtype=object).reshape(arr.shape) if arr.ndim else \
                    np.array(int(arr), dtype=object).reshape(())
                continue
            if arr.size <= SMALL_CONST or arr.dtype.kind not in "fc":
                if arr.dtype.kind == "b":
                    self.env[v] = relax.const(np.asarray(arr, bool), "bool")
                else:
                    self.env[v] = relax.const(np.ascontiguousarray(arr), str(arr.dtype))
                continue
            shape = list(arr.shape)
            nb = self._packable(v) if self.packing is None else self.packing.get(name, 0)
            if nb:
                self.packed[name] = nb
                shape = [arr.shape[1] // nb, arr.shape[0], nb]
            rv = relax.Var(_safe(name), relax.TensorType(shape=shape, dtype=str(arr.dtype)))
            params.append(name)
            param_vars.append(rv)
            self.env[v] = rv
        from .lowering.cache import in_place_order
        with self.bb.function(func_name, inputs + param_vars):
            with self.bb.dataflow():
                for node in in_place_order(g.nodes):
                    self.lower_node(node)
                outs = []
                for v in g.outputs:
                    outs.append(self.bb.emit_output(self.get(v)))
            self.bb.emit_func_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        mod = self.bb.get()
        return Lowered(mod, [v.name for v in g.inputs], params, [v.name for v in g.outputs], sorted(self.syms),
                       dict(self.packed), dict(self.packed_rows), self.origins)

    def _dense_operands(self, node: Node) -> bool:
        """MatMul(x, W) with W a constant 2-D f32 weight and x f32 of rank >= 2: the dense GEMM kernel."""
        bt, at = node.inputs[1].type, node.inputs[0].type
        return (node.inputs[1].is_constant and isinstance(bt, TensorType) and bt.rank == 2
                and isinstance(at, TensorType) and at.rank is not None and at.rank >= 2
                and at.dtype == bt.dtype and str(at.dtype) == "f32" and node.inputs[0] is not node.inputs[1])

    def _gated_packable(self, node: Node) -> bool:
        """A GatedMLP whose three weights are distinct f32 2-D constants with N divisible by the same NB."""
        from .kernels.cpu import mlp
        ws = node.inputs[1:4]
        if not all(w is not None and w.is_constant and w.const.ndim == 2 and w.const.dtype == np.float32 for w in ws):
            return False
        if len({id(w) for w in ws}) != 3 or str(node.inputs[0].dtype) != "f32":
            return False
        nbs = {mlp.pack_block(ws[0].const.shape[1]), mlp.pack_block(ws[1].const.shape[1])}
        return len(nbs) == 1 and 0 not in nbs and mlp.pack_block(ws[2].const.shape[1]) > 0

    def _packable(self, v: Value) -> int:
        """NB if every use of weight `v` is as the B operand of a dense MatMul (then it is bound pre-packed)."""
        from .kernels.cpu import mlp
        if self.kernels != "cpu" or v.is_graph_output or v.const.ndim != 2 or not v.uses:
            return 0
        for node, i in v.uses:
            if node.graph is not self.graph:
                return 0
            if node.qualified_op == "polyport::GatedMLP" and i in (1, 2, 3) and self._gated_packable(node):
                continue
            if node.qualified_op != "MatMul" or i != 1 or not self._dense_operands(node):
                return 0
        return mlp.pack_block(v.const.shape[1])

    def lower_node(self, node: Node) -> None:
        from . import lowering
        self.node = node
        key = node.qualified_op
        fn = getattr(self, "op_" + key.replace("polyport::", "polyport_"), None)
        if fn is None and (std := lowering.lookup(key)) is not None:
            fn = functools.partial(std, self)      # the standard-op families in targets/lowering/
        if fn is None:
            raise errors.UnsupportedOpError(
                f"node {node.name} ({key}): no lowering for this op in the {self.target_name} target")
        lowering.check_dtypes(self, node)
        try:
            outs = fn(node)
        except errors.UnsupportedOpError as e:
            if f"node {node.name} " in str(e):
                raise
            raise errors.UnsupportedOpError(f"node {node.name} ({key}): {e}") from e
        except errors.PolyportError:
            raise
        except Exception as e:  # a TVM type error: name the node
            raise errors.UnsupportedOpError(
                f"node {node.name} ({key}): the {self.target_name} target failed to lower it: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if outs is None:
            return
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for v, o in zip(node.outputs, outs):
            if o is None:
                continue
            if isinstance(o, np.ndarray):
                self.pv[v] = o
            else:
                self.env[v] = self._with_ir_shape(o, v)

    def _with_ir_shape(self, o, v: Value):
        """Where Relax lost a tensor's shape or re-derived it in a form it cannot prove equal (a reshape to
        `seq // 8`, `min(1, seq)` slice bounds), bind the shape the IR folded at import."""
        ty = getattr(o, "ty", None)
        t = v.type
        if not isinstance(ty, self.relax.TensorType) \
                or not isinstance(t, TensorType) or t.shape is None or any(d is None for d in t.shape):
            return o
        shape = [self.dim(d) for d in t.shape]
        have = list(ty.shape.values) if hasattr(ty.shape, "values") else None
        if have is not None and len(have) == len(shape) and all(
                self.analyzer.can_prove_equal(a, b) for a, b in zip(have, shape)):
            return o
        return self.bb.match_cast(o, self.relax.TensorType(shape=shape, dtype=ty.dtype))

    # ---- shape-value propagation helpers -------------------------------------------------
    def _pv_binary(self, node: Node, f):
        a, b = (self.known(v) for v in node.inputs[:2])
        if a is None or b is None:
            return None
        try:
            return np.vectorize(f, otypes=[object])(*np.broadcast_arrays(a, b)) if a.size and b.size else None
        except Exception:
            return None

    def _both(self, node: Node, relax_fn, pv_fn=None):
        if pv_fn is not None and node.outputs[0].dtype is not None and node.outputs[0].dtype.is_integer:
            r = self._pv_binary(node, pv_fn)
            if r is not None:
                return r
        a, b = (self.get(v) for v in node.inputs[:2])
        return self.emit(relax_fn(a, b))

    # ---- standard ops --------------------------------------------------------------------------
    def op_polyport_ShapeValue(self, node):
        dims = [self.dim(d) for d in node.attrs["dims"]]
        arr = np.empty(len(dims), dtype=object)
        arr[:] = dims
        return arr.reshape(()) if node.attrs.get("scalar") else arr

    def op_Add(self, node):
        return self._both(node, self.relax.op.add, lambda x, y: x + y)

    def op_Sub(self, node):
        return self._both(node, self.relax.op.subtract, lambda x, y: x - y)

    def op_Mul(self, node):
        return self._both(node, self.relax.op.multiply, lambda x, y: x * y)

    def op_Div(self, node):
        if node.outputs[0].dtype is not None and node.outputs[0].dtype.is_integer:
            r = self._pv_binary(node, lambda x, y: self.tirx.truncdiv(_pe(self, x), _pe(self, y)))
            if r is not None:
                return r
            return self.emit(self.relax.op.divide(self.get(node.inputs[0]), self.get(node.inputs[1])))
        return self._both(node, self.relax.op.divide)

    def op_Mod(self, node):
        if node.attrs.get("fmod", 0):       # C fmod: the sign of the dividend (relax mod truncates)
            return self.emit(self.relax.op.mod(self.get(node.inputs[0]), self.get(node.inputs[1])))
        r = self._pv_binary(node, lambda x, y: self.tirx.floormod(_pe(self, x), _pe(self, y)))
        if r is not None:
            return r
        return self.emit(self.relax.op.floor_mod(self.get(node.inputs[0]), self.get(node.inputs[1])))

    def _variadic(self, node, relax_fn, pv_fn):
        if len(node.inputs) == 2:
            return self._both(node, relax_fn, pv_fn)
        acc = self.get(node.inputs[0])
        for v in node.inputs[1:]:
            acc = self.emit(relax_fn(acc, self.get(v)))
        return acc

    def op_Max(self, node):
        return self._variadic(node, self.relax.op.maximum, lambda x, y: self.tirx.max(_pe(self, x), _pe(self, y)))

    def op_Min(self, node):
        return self._variadic(node, self.relax.op.minimum, lambda x, y: self.tirx.min(_pe(self, x), _pe(self, y)))

    def _unary(self, node, fn):
        return self.emit(fn(self.get(node.inputs[0])))

    def op_Neg(self, node):
        a = self.known(node.inputs[0])
        if a is not None:
            return np.vectorize(lambda x: -x, otypes=[object])(a)
        return self._unary(node, self.relax.op.negative)

    def op_Sigmoid(self, node): return self._unary(node, self.relax.op.sigmoid)
    def op_Cos(self, node): return self._unary(node, self.relax.op.cos)
    def op_Sin(self, node): return self._unary(node, self.relax.op.sin)
    def op_Exp(self, node): return self._unary(node, self.relax.op.exp)
    def op_Sqrt(self, node): return self._unary(node, self.relax.op.sqrt)
    def op_Tanh(self, node): return self._unary(node, self.relax.op.tanh)
    def op_Not(self, node): return self._unary(node, self.relax.op.logical_not)
    def op_Erf(self, node): return self._unary(node, self.relax.op.erf)
    def op_Reciprocal(self, node):
        x = self.get(node.inputs[0])
        return self.emit(self.relax.op.divide(self.relax.const(1.0, x.ty.dtype), x))

    def op_Relu(self, node):
        x = self.get(node.inputs[0])
        return self.emit(self.relax.op.nn.relu(x))

    def op_Pow(self, node):
        x, y = (self.get(v) for v in node.inputs)
        dt = x.ty.dtype
        if str(node.inputs[0].dtype) not in ("f16", "f32", "f64"):   # TVM's power is float only: exact in f64
            p = self.relax.op.power(self.relax.op.astype(x, "float64"), self.relax.op.astype(y, "float64"))
            return self.emit(self.relax.op.astype(p, dt))
        return self.emit(self.relax.op.power(x, y if y.ty.dtype == dt else self.relax.op.astype(y, dt)))

    def op_And(self, node): return self._both(node, self.relax.op.logical_and)
    def op_Or(self, node): return self._both(node, self.relax.op.logical_or)
    def op_Equal(self, node):
        if str(node.inputs[0].dtype) == "bool":  # TVM's LLVM codegen emits a float compare for bool == bool
            op = self.relax.op
            return self._both(node, lambda a, b: op.logical_not(op.logical_xor(a, b)))
        return self._both(node, self.relax.op.equal)
    def op_Greater(self, node): return self._both(node, self.relax.op.greater)
    def op_GreaterOrEqual(self, node): return self._both(node, self.relax.op.greater_equal)
    def op_Less(self, node): return self._both(node, self.relax.op.less)
    def op_LessOrEqual(self, node): return self._both(node, self.relax.op.less_equal)

    def op_Where(self, node):
        c, a, b = (self.get(v) for v in node.inputs)
        return self.emit(self.relax.op.where(c, a, b))

    def op_Cast(self, node):
        dt = _dtype(node.outputs[0].type)
        a = self.known(node.inputs[0])
        if a is not None and dt in ("int64", "int32"):
            return a
        return self.emit(self.relax.op.astype(self.get(node.inputs[0]), dt))

    def op_Identity(self, node):
        a = self.known(node.inputs[0])
        return a if a is not None else self.get(node.inputs[0])

    def op_MatMul(self, node):
        a, b = (self.get(v) for v in node.inputs)
        if self._dense_operands(node):
            from .kernels.cpu import mlp          # dense layer with constant weights: the scheduled GEMM kernel
            x2, shape = self._flatten2d(a)
            if node.inputs[1].name in self.packed:
                y = self._packed_gemm(x2, [b], "dense_packed")
                n = self.shape(b)[0] * self.shape(b)[2]
            else:
                y = self.bb.emit_te(mlp.matmul, x2, b, primfunc_name_hint="dense")
                n = self.shape(b)[-1]
            out = shape[:-1] + [self.simplify(n)]
            return self.emit(self.relax.op.reshape(y, out)) if len(shape) != 2 else y
        return self.emit(self.relax.op.matmul(a, b))

    def op_Transpose(self, node):
        x = self.get(node.inputs[0])
        perm = node.attrs.get("perm")
        return self.emit(self.relax.op.permute_dims(x, perm))

    def op_Softmax(self, node):
        from .lowering.reduce import coerced_2d
        return coerced_2d(self, node, self.relax.op.nn.softmax)

    def _out_shape(self, node, i=0):
        t = node.outputs[i].type
        if isinstance(t, TensorType) and t.shape is not None and all(d is not None for d in t.shape):
            return [self.dim(d) for d in t.shape]
        return None

    def op_Reshape(self, node):
        x = node.inputs[0]
        a = self.known(x)
        shape = self._out_shape(node)
        if shape is None:
            target = self.ints(node.inputs[1], "shape", node)
            in_shape = self.shape(self.get(x)) if a is None else [self.dim(n) for n in a.shape]
            shape = []
            for i, d in enumerate(target):
                di = self.as_int(d)
                if di == 0 and not node.attrs.get("allowzero", 0):
                    shape.append(in_shape[i])
                else:
                    shape.append(d)
            if any(self.as_int(d) == -1 for d in shape):
                total = 1
                for d in in_shape:
                    total = total * d
                known = 1
                for d in shape:
                    if self.as_int(d) != -1:
                        known = known * _pe(self, d)
                shape = [self.simplify(self.tirx.floordiv(_pe(self, total), known)) if self.as_int(d) == -1 else d
                         for d in shape]
            shape = [self.simplify(_pe(self, d)) for d in shape]
        if a is not None and all(self.as_int(d) is not None for d in shape):
            return a.reshape([self.as_int(d) for d in shape])
        return self.emit(self.relax.op.reshape(self.get(x), shape))

    def _axes_reshape(self, node):
        a = self.known(node.inputs[0])
        shape = self._out_shape(node)
        if a is not None and shape is not None and all(self.as_int(d) is not None for d in shape):
            return a.reshape([self.as_int(d) for d in shape])
        if shape is None:
            raise self.unsupported(node, "its output shape is not known")
        return self.emit(self.relax.op.reshape(self.get(node.inputs[0]), shape))

    def op_Unsqueeze(self, node):
        x = self.get(node.inputs[0]) if self.known(node.inputs[0]) is None else None
        if x is not None and self._out_shape(node) is None:
            axes = [self.as_int(d) for d in self.ints(node.inputs[1], "axes", node)]
            r = len(self.shape(x)) + len(axes)
            out = x
            for ax in sorted(a % r for a in axes):
                out = self.emit(self.relax.op.expand_dims(out, ax))
            return out
        return self._axes_reshape(node)

    def op_Squeeze(self, node):
        if self._out_shape(node) is None and self.known(node.inputs[0]) is None:
            x = self.get(node.inputs[0])
            axes = None if len(node.inputs) < 2 or node.inputs[1] is None else \
                [self.as_int(d) for d in self.ints(node.inputs[1], "axes", node)]
            return self.emit(self.relax.op.squeeze(x, axes))
        return self._axes_reshape(node)

    def op_Flatten(self, node):
        return self._axes_reshape(node)

    def op_Concat(self, node):
        axis = node.attrs["axis"]
        arrs = [self.known(v) for v in node.inputs]
        if all(a is not None for a in arrs):
            return np.concatenate(arrs, axis=axis)
        xs = [self.get(v) for v in node.inputs]
        return self.emit(self.relax.op.concat(xs, axis=axis))

    def op_Gather(self, node):
        axis = node.attrs.get("axis", 0)
        a, i = self.known(node.inputs[0]), self.known(node.inputs[1])
        if a is not None and i is not None and all(self.as_int(x) is not None for x in i.flat):
            idx = np.array([self.as_int(x) for x in i.flat], dtype=np.int64).reshape(i.shape)
            return np.take(a, idx, axis=axis)
        data, ind = self.get(node.inputs[0]), self.get(node.inputs[1])
        return self.emit(self.relax.op.take(data, ind, axis=axis, mode="wrap"))

    def op_GatherND(self, node):
        data, ind = self.get(node.inputs[0]), self.get(node.inputs[1])
        return self.emit(self.relax.op.gather_nd(data, ind, node.attrs.get("batch_dims", 0)))

    def op_GatherElements(self, node):
        data, ind = self.get(node.inputs[0]), self.get(node.inputs[1])
        return self.emit(self.relax.op.gather_elements(data, ind, node.attrs.get("axis", 0)))

    def op_ScatterND(self, node):
        if node.attrs.get("reduction", "none") not in ("none", b"none"):
            raise self.unsupported(node, f"reduction={node.attrs['reduction']}")
        d, i, u = (self.get(v) for v in node.inputs)
        return self.emit(self.relax.op.scatter_nd(d, i, u, "update"))

    def op_ScatterElements(self, node):
        red = node.attrs.get("reduction", "none")
        d, i, u = (self.get(v) for v in node.inputs)
        return self.emit(self.relax.op.scatter_elements(d, i, u, node.attrs.get("axis", 0),
                                                        "update" if red == "none" else red))

    def op_Expand(self, node):
        x = self.get(node.inputs[0])
        shape = self._out_shape(node)
        if shape is None:
            target = self.ints(node.inputs[1], "shape", node)
            xs = self.shape(x)
            r = max(len(xs), len(target))
            xs = [1] * (r - len(xs)) + xs
            target = [1] * (r - len(target)) + target
            shape = [t if self.as_int(a) == 1 else a for a, t in zip(xs, target)]
            shape = [self.simplify(_pe(self, d)) for d in shape]
        return self.emit(self.relax.op.broadcast_to(x, shape))

    def op_ConstantOfShape(self, node):
        value = node.attrs.get("value")
        value = np.zeros(1, np.float32) if value is None else np.asarray(value)
        shape = self._out_shape(node) or [self.simplify(_pe(self, d)) for d in self.ints(node.inputs[0], "shape", node)]
        fill = self.relax.const(value.reshape(()), "bool" if value.dtype == bool else str(value.dtype))
        # not R.full: TVM 0.27 legalizes it with a PrimType dtype where topi.full wants a string (TypeError)
        return self.emit(self.relax.op.broadcast_to(fill, shape))

    def op_Range(self, node):
        start, limit, delta = (self.known(v) for v in node.inputs)
        dt = _dtype(node.outputs[0].type)
        if start is None or limit is None or delta is None:
            raise self.unsupported(node, "start, limit and delta must be known scalars")
        s, l, d = (_pe(self, x.reshape(()).item()) for x in (start, limit, delta))
        return self.emit(self.relax.op.arange(s, l, d, dt))

    def op_Slice(self, node):
        x_known = self.known(node.inputs[0])
        starts = self.ints(node.inputs[1], "starts", node)
        ends = self.ints(node.inputs[2], "ends", node)
        x = None if x_known is not None else self.get(node.inputs[0])
        rank = x_known.ndim if x_known is not None else len(self.shape(x))
        axes = list(range(len(starts))) if len(node.inputs) < 4 or node.inputs[3] is None else \
            [self.as_int(a) for a in self.ints(node.inputs[3], "axes", node)]
        steps = [1] * len(starts) if len(node.inputs) < 5 or node.inputs[4] is None else \
            [self.as_int(a) for a in self.ints(node.inputs[4], "steps", node)]
        axes = [a % rank for a in axes]
        if x_known is not None and all(self.as_int(v) is not None for v in starts + ends):
            sl = [slice(None)] * rank
            for a, s0, e0, st in zip(axes, starts, ends, steps):
                sl[a] = slice(self.as_int(s0), self.as_int(e0), st)
            return x_known[tuple(sl)]
        if x is None:
            x = self.get(node.inputs[0])
        shape = self.shape(x)
        if any(st is None or st <= 0 for st in steps):
            raise self.unsupported(node, "negative or unknown steps")
        b, e = [], []
        for a, s0, e0 in zip(axes, starts, ends):
            n = shape[a]
            b.append(self._norm_index(s0, n))
            e.append(self._norm_index(e0, n))
        # Bounds normalised into [0, n] need no re-derivation by Relax, whose in-bounds canonicalisation
        # otherwise leaves if_then_else in symbolic shapes (FuseOps cannot infer those; the GPU builds fail).
        inbound = all(self.analyzer.can_prove(i >= 0) for i in b + e)
        return self.emit(self.relax.op.strided_slice(x, axes, b, e, steps, assume_inbound=inbound))

    def _norm_index(self, v, n):
        iv = self.as_int(v)
        tirx = self.tirx
        if iv is not None:
            if iv >= INT64_BIG:
                return n
            if iv <= -INT64_BIG:
                return tirx.IntImm("int64", 0)
            if iv < 0:
                return self.simplify(tirx.max(n + iv, 0))
            ni = self.as_int(n)
            return tirx.IntImm("int64", min(iv, ni)) if ni is not None else self.simplify(tirx.min(iv, n))
        return self.simplify(tirx.min(_pe(self, v), n))

    def op_Split(self, node):
        x = self.get(node.inputs[0])
        axis = node.attrs.get("axis", 0)
        shape = self.shape(x)
        axis %= len(shape)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = self.ints(node.inputs[1], "split", node)
        else:
            sizes = [self.dim(o.type.shape[axis]) for o in node.outputs]
        points, acc = [], 0
        for s in sizes[:-1]:
            acc = self.simplify(_pe(self, acc) + _pe(self, s))
            points.append(acc)
        tup = self.emit(self.relax.op.split(x, points, axis))
        return [self.emit(self.relax.TupleGetItem(tup, i)) for i in range(len(node.outputs))]

    def _axes_attr_or_input(self, node):
        if "axes" in node.attrs:
            return list(node.attrs["axes"])
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            return [self.as_int(a) for a in self.ints(node.inputs[1], "axes", node)]
        return None

    def _reduce(self, node, fn):
        x = self.get(node.inputs[0])
        axes = self._axes_attr_or_input(node)
        if axes is not None and not axes and node.attrs.get("noop_with_empty_axes", 0):
            return x
        if x.ty.dtype == "bool":          # TVM has no max/min identity for bool: reduce it as int8
            y = self.emit(fn(self.relax.op.astype(x, "int8"), axes or None, bool(node.attrs.get("keepdims", 1))))
            return self.emit(self.relax.op.astype(y, "bool"))
        return self.emit(fn(x, axes or None, bool(node.attrs.get("keepdims", 1))))

    def op_ReduceSum(self, node): return self._reduce(node, self.relax.op.sum)
    def op_ReduceMax(self, node): return self._reduce(node, self.relax.op.max)
    def op_ReduceMin(self, node): return self._reduce(node, self.relax.op.min)
    def op_ReduceMean(self, node): return self._reduce(node, self.relax.op.mean)

    def op_CumSum(self, node):
        axis = self.known(node.inputs[1])
        if axis is None:
            raise self.unsupported(node, "axis must be a constant")
        x = self.get(node.inputs[0])
        axis = int(axis.reshape(-1)[0])
        rev = node.attrs.get("reverse", 0)
        if rev:                       # a reversed scan is the scan of the flipped axis, flipped back
            x = self.emit(self.relax.op.flip(x, axis))
        y = self.emit(self.relax.op.cumsum(x, axis, exclusive=bool(node.attrs.get("exclusive", 0))))
        return self.emit(self.relax.op.flip(y, axis)) if rev else y

    def op_TopK(self, node):
        k = self.known(node.inputs[1])
        if k is None or self.as_int(k.reshape(-1)[0]) is None:
            raise self.unsupported(node, "k must be a constant")
        x = self.get(node.inputs[0])
        tup = self.emit(self.relax.op.topk(x, self.as_int(k.reshape(-1)[0]), node.attrs.get("axis", -1), "both",
                                           bool(node.attrs.get("largest", 1)), "int64"))
        return [self.emit(self.relax.TupleGetItem(tup, 0)), self.emit(self.relax.TupleGetItem(tup, 1))]

    # ---- fused ops ---------------------------------------------------------------------------
    def op_polyport_RMSNorm(self, node):
        from .kernels.cpu import norm
        x, w = (self.get(v) for v in node.inputs)
        return self.bb.emit_te(norm.rms_norm, x, w, float(node.attrs["epsilon"]), primfunc_name_hint="rms_norm")

    def op_polyport_Rotary(self, node):
        from .kernels.cpu import rotary
        x, c, s = (self.get(v) for v in node.inputs)
        return self.bb.emit_te(rotary.rotary, x, c, s, int(node.attrs.get("rotary_dim", 0)),
                               bool(node.attrs.get("interleaved", 0)), primfunc_name_hint="rotary")

    def _flatten2d(self, x):
        shape = self.shape(x)
        if len(shape) == 2:
            return x, shape
        m = 1
        for d in shape[:-1]:
            m = m * d
        return self.emit(self.relax.op.reshape(x, [self.simplify(m), shape[-1]])), shape

    def _packed_gemm(self, x2, ws, name: str, **gate):
        """x2 [M, K] times pre-packed weights [N/NB, K, NB] (one: dense; two: GatedMLP's gate and up,
        `gate` = act / clamp) through kernels/cpu/gemm.py."""
        from .kernels.cpu import gemm
        no, kdim, nb = (self.as_int(d) for d in self.shape(ws[0]))
        func = gemm.dense_packed_func(kdim, no, nb, dtype=x2.ty.dtype, gated=len(ws) == 2, **gate)
        gv = self.bb.add_func(func.with_attr("op_pattern", 8), name)      # opaque: FuseOps leaves it alone
        out = self.relax.TensorType(shape=[self.shape(x2)[0], self.simplify(no * nb)], dtype=x2.ty.dtype)
        return self.emit(self.relax.call_tir(gv, [x2] + list(ws), out))

    def op_polyport_GatedMLP(self, node):
        from .kernels.cpu import mlp
        x, wg, wu, wd = (self.get(v) for v in node.inputs)
        x2, shape = self._flatten2d(x)
        act, clamp = node.attrs.get("activation", "silu"), float(node.attrs.get("clamp", 0.0))
        names = [v.name for v in node.inputs[1:4]]
        if all(n in self.packed for n in names):
            h = self._packed_gemm(x2, [wg, wu], "gated_mlp_gate_up_packed", act=act, clamp=clamp)
            y = self._packed_gemm(h, [wd], "gated_mlp_down_packed")
            out_shape = shape[:-1] + [self.simplify(self.shape(wd)[0] * self.shape(wd)[2])]
        else:
            h = self.bb.emit_te(mlp.gate_up, x2, wg, wu, act, clamp, primfunc_name_hint="gated_mlp_gate_up")
            y = self.bb.emit_te(mlp.matmul, h, wd, primfunc_name_hint="gated_mlp_down")
            out_shape = shape[:-1] + [self.shape(wd)[-1]]
        return self.emit(self.relax.op.reshape(y, out_shape)) if len(shape) != 2 else y

    def op_polyport_Attention(self, node):
        q, k, v = (self.get(x) for x in node.inputs[:3])
        mask = self.get(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        sinks = self.get(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if self.kernels == "portable":
            return self._attention_portable(node, q, k, v, mask, sinks)
        return self._attention_cpu(node, q, k, v, mask, sinks)

    def _attention_portable(self, node, q, k, v, mask, sinks):
        """The TE compute (whole score rows, three reductions) for a target's own schedule."""
        from .kernels.portable import attention
        a = node.attrs
        kw = dict(num_heads=int(a["num_heads"]), kv_heads=int(a["kv_heads"]), scale=float(a["scale"]),
                  causal=bool(a.get("causal", 0)), window=int(a.get("window", 0)))

        def fn(q, k, v, *rest):
            it = iter(rest)
            m = next(it) if mask is not None else None
            s = next(it) if sinks is not None else None
            return attention.attention(q, k, v, m, s, **kw)

        return self.bb.emit_te(fn, *[x for x in (q, k, v, mask, sinks) if x is not None],
                               primfunc_name_hint="attention")

    def _attention_cpu(self, node, q, k, v, mask, sinks):
        """One call_tir into the hand-scheduled cpu kernel (visible key blocks only, online softmax)."""
        from .kernels.cpu import attention
        relax = self.relax
        qs, vs = self.shape(q), self.shape(v)
        d, dv = self.as_int(qs[3]), self.as_int(vs[3])
        if d is None or dv is None:
            raise self.unsupported(node, "head dims must be static")
        a = node.attrs
        func = attention.attention_func(
            num_heads=int(a["num_heads"]), kv_heads=int(a["kv_heads"]), d=d, dv=dv, scale=float(a["scale"]),
            causal=bool(a.get("causal", 0)), window=int(a.get("window", 0)),
            mask_shape=None if mask is None else [self.as_int(x) for x in self.shape(mask)],
            mask_dtype="float32" if mask is None else mask.ty.dtype, sinks=sinks is not None,
            sinks_dtype="float32" if sinks is None else sinks.ty.dtype, dtype=q.ty.dtype)
        gv = self.bb.add_func(func.with_attr("op_pattern", 8), "attention")   # opaque: FuseOps leaves it alone
        placeholder = relax.const(np.zeros(1, np.float32))                   # absent mask / sinks
        args = [q, k, v, placeholder if mask is None else mask, placeholder if sinks is None else sinks]
        out = relax.TensorType(shape=qs[:3] + [vs[3]], dtype=q.ty.dtype)
        return self.emit(relax.call_tir(gv, args, out))

    def op_polyport_MoE(self, node):
        if self.kernels == "portable":
            return self._moe_portable(node)
        return self._moe_cpu(node)

    def _moe_cpu(self, node):
        """One call_tir into the fused cpu MoE kernel (routing, expert grouping, GEMMs, combine)."""
        from .kernels.cpu import moe
        relax = self.relax
        ins = list(node.inputs) + [None] * (8 - len(node.inputs))
        x, router_w, e_bias, wg, wu, wd, hash_table, token_ids = ins
        a = node.attrs
        x2, shape = self._flatten2d(self.get(x))
        H, E = (self.as_int(d) for d in self.shape(self.get(router_w)))
        Ew, Hw, I = (self.as_int(d) for d in self.shape(self.get(wg)))
        Ho = self.as_int(self.shape(self.get(wd))[2])
        if None in (H, E, I, Ho) or (Ew, Hw) != (E, H):
            raise self.unsupported(node, "expert and router weights need static, matching shapes")
        groups = int(a.get("n_group", 1))
        if groups > 1 and E % groups:
            raise self.unsupported(node, f"{E} experts do not split into {groups} groups")
        spec = moe.MoeSpec(
            hidden=H, experts=E, top_k=int(a["top_k"]), inter=I, out=Ho, scoring=a.get("scoring", "softmax"),
            n_group=groups, topk_group=int(a.get("topk_group", 1)), renormalize=bool(a.get("renormalize", 0)),
            scaling=float(a.get("routed_scaling", 1.0)), act=a.get("activation", "silu"),
            clamp=float(a.get("clamp", 0.0)), x_dtype=x2.ty.dtype, w_dtype=self.get(wg).ty.dtype)
        if spec.scoring not in moe.SCORINGS:
            raise self.unsupported(node, f"scoring {spec.scoring!r}")
        if hash_table is not None:
            table = self.get(hash_table)
            spec = dataclasses.replace(spec, hash_vocab=self.as_int(self.shape(table)[0]), table_dtype=table.ty.dtype)
            tid = self.emit(relax.op.reshape(self.get(token_ids), [-1]))
            if tid.ty.dtype != "int64":
                tid = self.emit(relax.op.astype(tid, "int64"))
            args = [x2, self.get(router_w), table, tid]
        else:
            bias = self.get(e_bias) if e_bias is not None else relax.const(np.zeros(E, np.float32))  # + 0: exact
            if bias.ty.dtype != "float32":
                bias = self.emit(relax.op.astype(bias, "float32"))
            args = [x2, self.get(router_w), bias]
        gv = self.bb.add_func(moe.moe_func(spec), "moe")
        y = self.emit(relax.call_tir(gv, relax.Tuple(args + [self.get(wg), self.get(wu), self.get(wd)]),
                                     relax.TensorType([self.shape(x2)[0], Ho], x2.ty.dtype)))
        return self.emit(relax.op.reshape(y, shape[:-1] + [Ho])) if len(shape) != 2 else y

    def _moe_portable(self, node):
        """Routing as Relax ops, then the TE expert compute (only the chosen experts, weights read in place)."""
        from .kernels.portable import moe
        relax = self.relax
        op = relax.op
        ins = list(node.inputs) + [None] * (8 - len(node.inputs))
        x, router_w, e_bias, wg, wu, wd, hash_table, token_ids = ins
        a = node.attrs
        x2, shape = self._flatten2d(self.get(x))
        x2f = x2 if x2.ty.dtype == "float32" else self.emit(op.astype(x2, "float32"))
        logits = self.emit(op.matmul(x2f, self.get(router_w)))
        scoring = a.get("scoring", "softmax")
        if scoring == "softmax":
            scores = self.emit(op.nn.softmax(logits, -1))
        elif scoring == "sigmoid":
            scores = self.emit(op.sigmoid(logits))
        elif scoring == "sqrtsoftplus":
            big = relax.const(20.0, "float32")
            sp = self.emit(op.where(op.greater(logits, big), logits,
                                    op.log(op.add(op.exp(op.minimum(logits, big)), relax.const(1.0, "float32")))))
            scores = self.emit(op.sqrt(sp))
        else:
            raise self.unsupported(node, f"scoring {scoring!r}")
        if hash_table is not None:
            table = self.get(hash_table)
            tid = self.emit(op.astype(op.reshape(self.get(token_ids), [-1]), "int64"))
            # ids wrap modulo the table's rows, as the MoE reference does
            tid = self.emit(op.floor_mod(tid, relax.const(self.as_int(self.shape(table)[0]), "int64")))
            idx = self.emit(op.astype(op.take(table, tid, axis=0), "int64"))
        else:
            choice = scores if e_bias is None else self.emit(op.add(scores, self.get(e_bias)))
            groups = int(a.get("n_group", 1))
            if groups > 1:
                E = self.as_int(self.shape(choice)[1])
                T = self.shape(choice)[0]
                per = self.emit(op.reshape(choice, [T, groups, E // groups]))
                gscore = self.emit(op.sum(op.topk(per, 2, -1, "values", True), [-1]))
                kept = self.emit(op.topk(gscore, int(a.get("topk_group", 1)), -1, "values", True))
                gmask = self.emit(op.greater_equal(gscore, op.min(kept, [-1], keepdims=True)))   # [T, G]
                gmask = self.emit(op.reshape(op.broadcast_to(op.expand_dims(gmask, 2), [T, groups, E // groups]),
                                             [T, E]))
                choice = self.emit(op.where(gmask, choice, relax.const(float("-inf"), "float32")))
            idx = self.emit(op.topk(choice, int(a["top_k"]), -1, "indices", True, "int64"))
        w = self.emit(op.gather_elements(scores, idx, 1))
        if a.get("renormalize", 0):
            w = self.emit(op.divide(w, op.add(op.sum(w, [-1], keepdims=True), relax.const(1e-20, "float32"))))
        scale = float(a.get("routed_scaling", 1.0))
        if scale != 1.0:
            w = self.emit(op.multiply(w, relax.const(scale, "float32")))
        y = self.bb.emit_te(moe.moe_experts, x2, idx, w, self.get(wg), self.get(wu), self.get(wd),
                            a.get("activation", "silu"), float(a.get("clamp", 0.0)), primfunc_name_hint="moe_experts")
        return self.emit(op.reshape(y, shape)) if len(shape) != 2 else y


def _pe(lw: _Lowerer, x):
    """A PrimExpr (int64) for an int / PrimExpr."""
    if isinstance(x, (int, np.integer)):
        return lw.tirx.IntImm("int64", int(x))
    if isinstance(x, SymExpr):
        return lw.dim(x)
    return x


def _safe(name: str) -> str:
    return "w_" + "".join(c if c.isalnum() else "_" for c in name)


def lower_functions(graphs: dict[str, Graph], target_name: str = "cpu", kernels: str = "cpu") -> dict[str, Lowered]:
    """Lower graphs that share weights (constants of the same name) into one IRModule, one Relax
    function per graph name (every Lowered's `mod` is that module). The loader binds each weight
    once, so a weight is pre-packed only where every graph using it can take it packed."""
    import tvm.relax
    bb = tvm.relax.BlockBuilder()
    lowerers = {name: _Lowerer(g, target_name, kernels, bb=bb) for name, g in graphs.items()}
    blocks: dict[str, set[int]] = {}
    for lw in lowerers.values():
        for wname, v in lw.graph.constants.items():
            if v.uses:
                blocks.setdefault(wname, set()).add(lw._packable(v))
    packing = {w: nbs.pop() for w, nbs in blocks.items() if len(nbs) == 1 and 0 not in nbs}
    out = {}
    for name, lw in lowerers.items():
        lw.packing = packing
        out[name] = lw.lower(name)
    mod = bb.get()
    for lowered in out.values():
        lowered.mod = mod
    return out


def lower_to_relax(graph: Graph, target_name: str = "cpu", kernels: str = "cpu") -> Lowered:
    """Lower a fused polyport graph to a Relax IRModule (function `main`).

    `kernels` (one of KERNEL_SETS): "cpu" uses the hand-written cpu kernels and binds dense
    weights pre-packed as [N/NB, K, NB]; "portable" uses unscheduled TE computes (the GPU
    targets schedule them with dlight) and keeps every weight as stored."""
    return _Lowerer(graph, target_name, kernels).lower()

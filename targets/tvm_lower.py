"""polyport IR (after the default pipeline) -> a TVM Relax IRModule with symbolic dims.

This module holds what every lowering shares: values, dims and shape propagation.
Every input symbol (`seq`, ...) becomes one `tirx.Var` ("int64"), so one build
serves every length. Each op's lowering is looked up in the table of the chosen
kernel set (`targets/lowering/`: standard ops map to `relax.op.*`, the fused ops
to the kernels of `targets/kernels/`). Weights become function parameters (after
the graph inputs, in `params` order) so they are never baked into the library;
small constants become `relax.const`.

Int64 tensors that hold shapes (`polyport::ShapeValue`, shape arithmetic left
in the graph) are also tracked as lists of PrimExprs, so Reshape / Expand /
Slice / Range see their operands symbolically.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from .. import errors
from ..ir.graph import Graph, Node, Value
from ..ir.symbolic import Atom, SymExpr
from ..ir.types import TensorType
from . import lowering
from .fusion import OPAQUE
from .lowering import KERNEL_SETS
from .lowering.dense import packable
# constants with more elements than this become parameters (bound from the artifact's weights)
SMALL_CONST = 64


@dataclasses.dataclass
class Lowered:
    mod: Any                      # tvm.IRModule
    inputs: list[str]             # graph input names, in parameter order
    params: list[str]             # weight names, after the inputs
    outputs: list[str]
    symbols: list[str]
    packed: dict = dataclasses.field(default_factory=dict)   # weight name -> NB: bound as [.., N/NB, K, NB]
    packed_rows: dict = dataclasses.field(default_factory=dict)   # quantized operand -> NB: [N, X] as [N/NB, X, NB]
    origins: list = dataclasses.field(default_factory=list)   # (emitted Relax call, the node it lowers)


def _tvm():
    import tvm
    from tvm import relax, te, tirx, topi  # noqa: F401
    return tvm


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

    def prim(self, x):
        """A PrimExpr (int64) for an int / SymExpr / PrimExpr."""
        if isinstance(x, (int, np.integer)):
            return self.tirx.IntImm("int64", int(x))
        if isinstance(x, SymExpr):
            return self.dim(x)
        return x

    @staticmethod
    def tvm_dtype(t: TensorType) -> str:
        """The TVM dtype name of a tensor type's elements."""
        if t.dtype is None or t.dtype.numpy is None or t.dtype.name == "str":
            raise errors.UnsupportedOpError(f"cpu target: value of type {t} has no supported element type")
        return "bool" if t.dtype.name == "bool" else str(t.dtype.numpy)

    @staticmethod
    def as_int(e) -> Optional[int]:
        if isinstance(e, (int, np.integer)):
            return int(e)
        if hasattr(e, "value") and isinstance(getattr(e, "value"), int):
            return int(e.value)
        return None

    def add_kernel(self, func, name: str):
        """A kernel written scheduled (targets/kernels) as `name`, marked opaque: fusion leaves it whole."""
        return self.bb.add_func(func.with_attr("op_pattern", OPAQUE), name)

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
        dt = self.tvm_dtype(v.type)
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
            rv = relax.Var(v.name, relax.TensorType(shape=[self.dim(d) for d in t.shape], dtype=self.tvm_dtype(t)))
            inputs.append(rv)
            self.env[v] = rv
        params, param_vars = [], []
        self.packed: dict[str, int] = {}
        self.packed_rows: dict[str, int] = {}
        from .lowering import quant
        for name, v in g.constants.items():
            arr = v.const
            layout = quant.param_layout(self, v)
            if layout is not None:    # quantized weight operands: parameters, codes bound as stored or column-blocked
                qnb, k_major = layout
                shape = list(arr.shape)
                if qnb and k_major:      # [.., K, N] stored, [.., N/NB, K, NB] bound (as dense weights)
                    shape = [*arr.shape[:-2], arr.shape[-1] // qnb, arr.shape[-2], qnb]
                    self.packed[name] = qnb
                elif qnb:                # [N, K] stored, [N/NB, K, NB] bound
                    shape = [arr.shape[0] // qnb, arr.shape[1], qnb]
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
            if arr.size <= SMALL_CONST or not (arr.dtype.kind in "fc" or str(arr.dtype) == "bfloat16"):
                if arr.dtype.kind == "b":
                    self.env[v] = relax.const(np.asarray(arr, bool), "bool")
                else:
                    self.env[v] = relax.const(np.ascontiguousarray(arr), str(arr.dtype))
                continue
            shape = list(arr.shape)
            nb = packable(self, v) if self.packing is None else self.packing.get(name, 0)
            if nb:
                self.packed[name] = nb
                shape = [*arr.shape[:-2], arr.shape[-1] // nb, arr.shape[-2], nb]
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

    def lower_node(self, node: Node) -> None:
        self.node = node
        key = node.qualified_op
        fn = lowering.lookup(key, self.kernels)
        if fn is None:
            raise errors.UnsupportedOpError(
                f"node {node.name} ({key}): no lowering for this op in the {self.target_name} target")
        lowering.check_dtypes(self, node)
        try:
            outs = fn(self, node)
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
        if have is not None:
            if len(have) != len(shape) or any(self.as_int(a) is not None and self.as_int(b) is not None
                                              and self.as_int(a) != self.as_int(b) for a, b in zip(have, shape)):
                return o      # a static disagreement (a 0-d value held as [1]) no cast can fix
            if all(self.analyzer.can_prove_equal(a, b) for a, b in zip(have, shape)):
                return o
        return self.bb.match_cast(o, self.relax.TensorType(shape=shape, dtype=ty.dtype))

    # ---- shape-value propagation helpers -------------------------------------------------
    def pv_binary(self, node: Node, f):
        """f over two known integer operands (None unless both are known)."""
        a, b = (self.known(v) for v in node.inputs[:2])
        if a is None or b is None:
            return None
        try:
            return np.vectorize(f, otypes=[object])(*np.broadcast_arrays(a, b)) if a.size and b.size else None
        except Exception:
            return None

    def both(self, node: Node, relax_fn, pv_fn=None):
        """A binary op: `pv_fn` on known integer operands, else the Relax op."""
        if pv_fn is not None and node.outputs[0].dtype is not None and node.outputs[0].dtype.is_integer:
            r = self.pv_binary(node, pv_fn)
            if r is not None:
                return r
        a, b = (self.get(v) for v in node.inputs[:2])
        return self.emit(relax_fn(a, b))


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
                blocks.setdefault(wname, set()).add(packable(lw, v))
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

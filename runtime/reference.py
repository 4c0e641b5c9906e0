"""The reference executor: runs any IR graph on NumPy. The oracle for every pass and target."""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .. import errors
from ..ir import dtypes, shape_value  # noqa: F401 - registers polyport::ShapeValue
from ..ir.graph import Graph, Node, Value
from ..ir.index_inputs import index_ranges
from ..ir.onnx_reference import StandardOpRunner
from ..ir.ops import RunContext, lookup
from ..ir.symbolic import SymExpr
from ..ir.types import TensorType
from .generation import Generator, cache_shapes


class ReferenceSession:
    """Prepared once per graph; `run(feeds)` binds the symbolic dims from the inputs' shapes.

    With `check_types=True` every intermediate value is checked against its
    inferred type: a static dim or a dim over bound symbols must match exactly.
    That is how the tests catch a wrong shape inference, not only wrong outputs."""

    def __init__(self, graph: Graph, *, check_types: bool = False):
        self.graph = graph
        self.check_types = check_types
        self.index_ranges = index_ranges(graph)
        self._runners: dict[Node, Any] = {}
        for node in graph.nodes:
            self._runners[node] = self._runner(node)

    def _runner(self, node: Node):
        d = lookup(node.domain, node.op_type)
        if d is not None and d.reference is not None:
            return d.reference
        if node.domain in ("", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training"):
            return StandardOpRunner(node, self.graph.opset_imports)
        raise errors.UnsupportedOpError(
            f"node {node.name} ({node.qualified_op}): no reference implementation for this op")

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.graph.outputs]

    def run(self, feeds: Mapping[str, Any], symbols: Optional[Mapping[str, int]] = None) -> dict[str, Any]:
        """Run on `feeds`; `symbols` binds dims no input defines on its own (a region cut from a graph)."""
        # first: it checks `feeds` itself
        bindings = {**(symbols or {}), **bind_inputs(self.graph, feeds, self.index_ranges)}
        feeds = {k: _as_array(x) for k, x in feeds.items()}
        ctx = RunContext(bindings, self.graph.opset_imports.get("", 0))
        env: dict[Value, Any] = {v: v.const for v in self.graph.constants.values()}
        for v in self.graph.inputs:
            env[v] = feeds[v.name]
        for node in self.graph.nodes:
            args = [env[v] if v is not None else None for v in node.inputs]
            runner = self._runners[node]
            try:
                if isinstance(runner, StandardOpRunner):
                    outs = runner(args, [env[v] for v in runner.captures])
                else:
                    outs = runner(node, args, ctx)
            except errors.PolyportError:
                raise
            except Exception as e:
                raise errors.ExecutionError(
                    f"node {node.name} ({node.qualified_op}) failed: {type(e).__name__}: {e}") from e
            for v, x in zip(node.outputs, outs):
                env[v] = x
                if self.check_types:
                    _check_against_type(node, v, x, bindings)
        return {v.name: env[v] for v in self.graph.outputs}


def run(graph: Graph, feeds: Mapping[str, Any]) -> dict[str, Any]:
    return ReferenceSession(graph).run(feeds)


def bind_inputs(graph: Graph, feeds: Mapping[str, Any],
                ranges: Optional[Mapping[str, tuple[int, int]]] = None) -> dict[str, int]:
    """Check feeds against the graph inputs (names, dtypes, ranks, static dims, index ranges); bind symbols."""
    return check_feeds([(v.name, v.type) for v in graph.inputs], feeds, ranges)


class _Spec(NamedTuple):
    name: str
    type: Any


def check_feeds(specs: Sequence[tuple[str, Any]], feeds: Mapping[str, Any],
                ranges: Optional[Mapping[str, tuple[int, int]]] = None) -> dict[str, int]:
    """Check feeds against (name, type) specs and index `ranges` (ir/index_inputs.py); return the symbols
    their shapes bind.

    Shared by the reference executor and every artifact session."""
    inputs = [_Spec(n, t) for n, t in specs]
    names = [v.name for v in inputs]
    if not isinstance(feeds, Mapping):
        raise errors.InputError(f"feeds must be a mapping of input name -> NumPy array (the model's inputs are "
                                f"{names}), got {type(feeds).__name__}")
    unknown = sorted(repr(k) for k in set(feeds) - set(names))
    if unknown:
        raise errors.InputError(f"unknown input {unknown[0]}; the model's inputs are {names}")
    bindings: dict[str, int] = {}
    deferred = []
    for v in inputs:
        if v.name not in feeds:
            raise errors.InputError(f"missing input {v.name!r} ({v.type})")
        x = _as_array(feeds[v.name])
        t = v.type
        if not isinstance(t, TensorType):
            continue
        if not isinstance(x, np.ndarray):
            raise errors.InputError(f"input {v.name!r}: expected a NumPy array of {t}, got {type(x).__name__}")
        if t.dtype is not None and t.dtype.numpy is not None and t.dtype.name != "str" and x.dtype != t.dtype.numpy:
            raise errors.InputError(f"input {v.name!r}: dtype {dtypes.from_numpy(x.dtype) if _known(x) else x.dtype} "
                                    f"given, the model expects {t.dtype} ({t})")
        if t.shape is None:
            continue
        if x.ndim != len(t.shape):
            raise errors.InputError(f"input {v.name!r}: rank {x.ndim} (shape {list(x.shape)}) given, "
                                    f"the model expects rank {len(t.shape)} ({t})")
        for axis, (d, n) in enumerate(zip(t.shape, x.shape)):
            if isinstance(d, int) and d != n:
                raise errors.InputError(f"input {v.name!r}: dim {axis} is {n}, the model expects {d} ({t})")
            if isinstance(d, SymExpr):
                if len(d.terms) == 1 and d.terms.get((next(iter(d.symbols)),)) == 1:
                    s = next(iter(d.symbols))
                    if s in bindings and bindings[s] != n:
                        raise errors.InputError(f"input {v.name!r}: dim {axis} ({s}) is {n}, but another input "
                                                f"bound {s} = {bindings[s]}")
                    bindings[s] = n
                else:
                    deferred.append((v, axis, d, n))
    for v, axis, d, n in deferred:
        try:
            want = d.evaluate(bindings)
        except KeyError:
            continue
        if want != n:
            raise errors.InputError(f"input {v.name!r}: dim {axis} is {n}, the model expects {d} = {want}")
    for name, (lo, hi) in (ranges or {}).items():
        _check_range(name, _as_array(feeds[name]), lo, hi)
    return bindings


def _check_range(name: str, x: np.ndarray, lo: int, hi: int) -> None:
    """Index inputs must stay in [lo, hi]: a compiled Gather would wrap or read out of bounds."""
    if x.size == 0 or lo <= x.min() and x.max() <= hi:
        return
    bad = (x < lo) | (x > hi)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise errors.InputError(f"input {name!r}: value {x[at]} at {list(at)} is outside the valid index range "
                                f"[{lo}, {hi}] (it indexes an axis of size {hi + 1})")


def _as_array(x: Any) -> Any:
    """A NumPy scalar (`np.float32(2.0)`: what `arr[()]` and onnx's test data give for a 0-d
    tensor) is a typed 0-d value: fed as the 0-d array it stands for. Python scalars are not."""
    return np.asarray(x) if isinstance(x, np.generic) else x


def _known(x: np.ndarray) -> bool:
    try:
        dtypes.from_numpy(x.dtype)
        return True
    except dtypes.UnknownDType:
        return False


def _check_against_type(node: Node, v: Value, x: Any, bindings: dict[str, int]) -> None:
    t = v.type
    if not isinstance(t, TensorType) or not isinstance(x, np.ndarray):
        return
    if t.dtype is not None and t.dtype.numpy is not None and t.dtype.name != "str" and x.dtype != t.dtype.numpy:
        raise AssertionError(f"node {node.name} ({node.qualified_op}): output {v.name} has dtype {x.dtype}, "
                             f"inferred {t.dtype}")
    if t.shape is None:
        return
    if len(t.shape) != x.ndim:
        raise AssertionError(f"node {node.name} ({node.qualified_op}): output {v.name} has shape {x.shape}, "
                             f"inferred {t}")
    for d, n in zip(t.shape, x.shape):
        if d is None:
            continue
        try:
            want = d if isinstance(d, int) else d.evaluate(bindings)
        except KeyError:
            continue
        if want != n:
            raise AssertionError(f"node {node.name} ({node.qualified_op}): output {v.name} has shape "
                                 f"{list(x.shape)}, inferred {t} = {want} at bindings {bindings}")


class ReferenceGenerator(Generator):
    """The reference executor over the derived generation programs: the oracle for every target's decode.

    `graph` is the fused cache-less graph (what `run` executes, and what generation recomputes when a
    layer cannot be cached); `programs` and their manifest entry `generation` come from
    passes/derive_generation.py (`compiler.reference_generator` derives them: the runtime never does)."""

    def __init__(self, graph: Graph, programs, generation: Mapping[str, Any]):
        self.generation = generation
        self._full = ReferenceSession(graph)
        self._programs = {name: ReferenceSession(g) for name, g in (("prefill", programs.prefill),
                                                                   ("decode", programs.decode)) if g is not None}
        self.input_names, self.output_names = self._full.input_names, self._full.output_names

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return self._full.run(feeds)

    def new_cache(self, batch: int, max_length: int) -> dict[str, np.ndarray]:
        return new_cache_arrays(self.generation, batch, max_length)

    def run_program(self, name: str, feeds: Mapping[str, np.ndarray], cache: dict[str, np.ndarray]) -> np.ndarray:
        out = self._programs[name].run({**feeds, **cache})
        for tensor in cache:
            cache[tensor] = out[f"{tensor}.out"]
        return out["logits"]


def new_cache_arrays(generation: Mapping[str, Any], batch: int, max_length: int) -> dict[str, np.ndarray]:
    """Zeroed per-layer cache buffers [batch, heads, slots, dim], in the programs' input order."""
    return {name: np.zeros(shape, dtype) for name, (shape, dtype) in cache_shapes(generation, batch, max_length).items()}

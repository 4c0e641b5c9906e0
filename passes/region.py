"""Cut a region out of a graph and check that a fused replacement means the same.

A fusion proposes: "these values in, this value out, computed by this one
fused node". `equivalent` cuts the region between them from the graph, runs it
and the proposed node on the reference executor with random inputs at several
sequence lengths, and compares. This is the final word on whether a match
means what the pattern claims, whatever chain the exporter produced.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..ir import fused
from ..ir.graph import Graph, Node, Value
from ..ir.symbolic import SymExpr
from ..ir.types import TensorType
from .pattern import NoMatch

TRIAL_SYMBOL_VALUES = (1, 3, 8)
# Where a region's shapes hold floor divisions (`seq // 8`: compressed attention), short lengths give
# empty tensors; one longer trial makes sure several entries are compared.
LONG_TRIAL = 19


def _trial_values(values: Sequence[Value]) -> tuple[int, ...]:
    floors = any(isinstance(d, SymExpr) and not d.is_polynomial
                 for v in values if isinstance(v.type, TensorType) and v.type.shape is not None for d in v.type.shape)
    return TRIAL_SYMBOL_VALUES + (LONG_TRIAL,) if floors else TRIAL_SYMBOL_VALUES


def region_nodes(inputs: Sequence[Value], output: Value) -> list[Node]:
    """The nodes computing `output` from `inputs` (constants and ShapeValues count as known).

    Raises ValueError if the output depends on a value outside the region."""
    stop = {id(v) for v in inputs}
    seen: dict[int, Node] = {}
    stack = [output]
    while stack:
        v = stack.pop()
        if id(v) in stop or v.const is not None:
            continue
        node = v.producer
        if node is None:
            raise ValueError(f"%{v.name} is a graph input outside the region")
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(i for i in node.inputs if i is not None)
    order = {id(n): i for i, n in enumerate(output.producer.graph.nodes)}
    return sorted(seen.values(), key=lambda n: order[id(n)])


def region_graph(inputs: Sequence[Value], output: Value) -> Graph:
    """A standalone graph of the region (shares the constants' arrays)."""
    g = Graph("region")
    g.opset_imports.update(output.producer.graph.root().opset_imports)
    vmap: dict[int, Value] = {}
    for v in inputs:
        vmap[id(v)] = g.add_input(v.name, v.type)
    g.set_outputs([copy_region(g, vmap, inputs, output)])
    return g


def copy_region(g: Graph, vmap: dict[int, Value], inputs: Sequence[Value], output: Value) -> Value:
    """Copy the nodes computing `output` from `inputs` into `g` (vmap: id(original) -> copy, updated)."""
    def get(v: Optional[Value]) -> Optional[Value]:
        if v is None:
            return None
        if id(v) not in vmap:
            assert v.const is not None, v
            vmap[id(v)] = g.add_constant(v.name, v.const)
        return vmap[id(v)]

    for node in region_nodes(inputs, output):
        if id(node.outputs[0]) in vmap:
            continue
        new = g.make_node(node.op_type, [get(i) for i in node.inputs], attrs=dict(node.attrs), domain=node.domain,
                          output_names=[o.name for o in node.outputs], types=[o.type for o in node.outputs],
                          name=node.name)
        for o, n in zip(node.outputs, new.outputs):
            vmap[id(o)] = n
    return get(output)


def random_feeds(values: Sequence[Value], symbols: dict[str, int], rng: np.random.Generator,
                 int_high: dict[str, int | SymExpr] | None = None, unknown: int = 3) -> dict[str, np.ndarray]:
    """Random inputs; an unknown dim (None: a length import could not express, like seq // 8) is `unknown`
    everywhere, so unknown dims that must agree do (a region that needs them to differ fails to run: no fusion)."""
    feeds = {}
    for v in values:
        t = v.type
        assert isinstance(t, TensorType) and t.shape is not None and t.dtype is not None, v
        shape = tuple(d if isinstance(d, int) else unknown if d is None else d.evaluate(symbols) for d in t.shape)
        if t.dtype.is_integer:
            high = (int_high or {}).get(v.name, 16)          # a dim (seq: positions) is evaluated at the trial
            high = max(1, high.evaluate(symbols)) if isinstance(high, SymExpr) else high
            feeds[v.name] = rng.integers(0, high, size=shape).astype(t.dtype.numpy)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(t.dtype.numpy)
    return feeds


def equivalent(inputs: Sequence[Value], output: Value, op_type: str, operands: Sequence[Optional[Value]],
               attrs: dict, *, seed: int = 0, int_high: dict[str, int | SymExpr] | None = None) -> None:
    """Check that `op_type(*operands, **attrs)` computes what the region `inputs -> output` computes,
    within `tolerance(output.dtype)`; raises NoMatch saying how it differs.

    Operands are region inputs, constants, or values computed from them (a rewrite's
    own small prelude, say a Concat; its nodes are copied along)."""
    from ..runtime.reference import ReferenceSession
    try:
        before = region_graph(inputs, output)
    except ValueError as e:
        raise NoMatch(str(e)) from None
    after = Graph("fused")
    after.opset_imports.update(before.opset_imports)
    vmap = {id(v): after.add_input(v.name, v.type) for v in inputs}
    args = []
    for v in operands:
        if v is not None and id(v) not in vmap:
            if v.const is not None:
                vmap[id(v)] = after.add_constant(v.name, v.const)
            else:
                try:
                    if v.producer is None:
                        raise ValueError(v.name)
                    copy_region(after, vmap, inputs, v)
                except ValueError:
                    raise NoMatch(f"operand %{v.name} is not computed from the region's inputs") from None
        args.append(vmap[id(v)] if v is not None else None)
    after.set_outputs([fused.build(after, op_type, args, attrs, output.type)])
    symbols = sorted({s for v in inputs if isinstance(v.type, TensorType) for s in v.type.symbols})
    rng = np.random.default_rng(seed)
    rtol = tolerance(output.dtype)
    try:
        run_before, run_after = ReferenceSession(before), ReferenceSession(after)
        for n in _trial_values([*inputs, output]):
            binding = {s: n for s in symbols}
            feeds = random_feeds(inputs, binding, rng, int_high, unknown=n)
            want = run_before.run(feeds, binding)[before.outputs[0].name]
            got = run_after.run(feeds, binding)[after.outputs[0].name]
            if got.shape != want.shape:
                raise NoMatch(f"shape {got.shape} != {want.shape} at {binding}")
            if not want.size:
                continue
            scale, err = _difference(got, want)
            if not err <= rtol * scale:
                raise NoMatch(f"differs by {err:.3g} (max |out| {scale:.3g}, tolerance {rtol:g}) at {binding}")
    except NoMatch:
        raise
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is not equivalent
        raise NoMatch(f"{type(e).__name__}: {e}") from None


def _difference(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |finite want|, max |got - want|): equal entries (infinities of a mask too) differ by 0."""
    want64 = want.astype(np.float64)
    finite = np.abs(want64[np.isfinite(want64)])
    scale = max(float(finite.max()) if finite.size else 0.0, 1e-6)
    with np.errstate(invalid="ignore"):
        diff = np.where(got == want, 0.0, np.abs(got.astype(np.float64) - want64))
    return scale, float(np.nan_to_num(diff, nan=np.inf).max())


def tolerance(dtype) -> float:
    """How far (x max |output|) a fused op may be from the region it replaces, per dtype: 1e-4 in fp32 and
    fp64; in narrower floats 8 units of their roundoff and at least 2e-2 (the region rounds after every op,
    the fused op once): f16 2e-2, bf16 6.25e-2."""
    if dtype is None or dtype.name in ("f32", "f64"):
        return 1e-4
    import ml_dtypes
    try:
        eps = float(ml_dtypes.finfo(dtype.numpy).eps)
    except (TypeError, ValueError):
        eps = 0.0
    return max(2e-2, 8 * eps)


def replace_with_fused(output: Value, op_type: str, operands: Sequence[Optional[Value]], attrs: dict) -> Value:
    """Compute `output` with one fused node instead (the region left dead is removed by DCE)."""
    anchor = output.producer
    new = fused.build(anchor.graph, op_type, operands, attrs, output.type, before=anchor)
    if output.is_graph_output:  # graph outputs keep their names
        new.name, output.name = output.name, new.name
    output.replace_all_uses_with(new)
    return new

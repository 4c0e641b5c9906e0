"""Small meaning checks shared by the fusion rules (RMSNorm, Rotary, GatedMLP).

Exporters cut tensors along the last axis in several spellings (Slice with or
without axes/steps, INT64_MAX ends, negative indices; Split by sizes or by
`num_outputs`). `part_of` reads all of them as one thing: "this value is
source[..., indices]" with `indices` a Python range, so rules compare ranges
(`range(0, 8) == range(0, 8, 1)`) instead of spellings.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..ir.graph import Node, Value
from ..ir.ops import known_value


@dataclasses.dataclass(frozen=True)
class Part:
    """`value == source[..., indices]` on the last axis."""
    source: Value
    indices: range


def rank(v: Optional[Value]) -> Optional[int]:
    shape = v.shape if v is not None else None
    return None if shape is None else len(shape)


def last_dim(v: Optional[Value]) -> Optional[int]:
    """The size of v's last axis when it is static."""
    shape = v.shape if v is not None else None
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def is_last_axis(axis, v: Value) -> bool:
    r = rank(v)
    return r is not None and axis is not None and int(axis) in (-1, r - 1)


def ints(v: Optional[Value]) -> Optional[list[int]]:
    """A constant integer vector (or scalar) as a list; None when not known."""
    arr = known_value(v)
    if arr is None or arr.dtype == object or arr.dtype.kind not in "iu":
        return None
    return [int(a) for a in arr.reshape(-1)]


def scalar(v: Optional[Value]) -> Optional[float]:
    """The value of a one-element numeric constant; None otherwise."""
    arr = known_value(v)
    if arr is None or arr.dtype == object or arr.size != 1:
        return None
    return float(arr.reshape(()))


def part_of(v: Optional[Value]) -> Optional[Part]:
    """Read `v` as a last-axis Slice or Split of another value, or None."""
    node = v.producer if v is not None else None
    if node is None or node.domain or not node.inputs:
        return None
    x = node.inputs[0]
    d = last_dim(x)
    if d is None:
        return None
    if node.op_type == "Slice":
        args = [ints(node.inputs[i]) if i < len(node.inputs) and node.inputs[i] is not None else None
                for i in range(1, 5)]
        starts, ends, axes, steps = args
        axes = axes if axes is not None else list(range(len(starts or [])))
        steps = steps if steps is not None else [1] * len(axes)
        if starts is None or ends is None or len(axes) != 1 or not is_last_axis(axes[0], x) or steps[0] <= 0:
            return None
        return Part(x, range(*slice(starts[0], ends[0], steps[0]).indices(d)))
    if node.op_type == "Split" and is_last_axis(node.attrs.get("axis", 0), x):
        sizes = ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if sizes is None:
            n = node.attrs.get("num_outputs", len(node.outputs))
            chunk = -(-d // n)
            sizes = [min(chunk, d - i * chunk) for i in range(n)]
        if sum(sizes) != d or len(sizes) != len(node.outputs):
            return None
        start = sum(sizes[:v.index])
        return Part(x, range(start, start + sizes[v.index]))
    return None


def sole_user(v: Value) -> Optional[Node]:
    """The one node reading `v` (through one input), when `v` is not also a graph output."""
    uses = v.uses
    return uses[0][0] if len(uses) == 1 and not v.is_graph_output else None


def private(nodes: list[Node], root: Node) -> bool:
    """Every node but `root` is used only by nodes in `nodes` (so the region may be replaced)."""
    inside = {id(n) for n in nodes}
    return all(not o.is_graph_output and all(id(u) in inside for u, _ in o.uses)
               for n in nodes if n is not root for o in n.outputs)


def const_like(graph, name: str, array: np.ndarray) -> Value:
    """A new graph constant (for a weight the rewrite transposes, slices or makes up)."""
    return graph.add_constant(name, np.ascontiguousarray(array))

"""Graph inputs used as indices (token ids): the range a feed must keep to.

A Gather index outside [-n, n) (n: the gathered axis's size) is an error in
ONNX, but a compiled kernel may wrap it or read out of bounds. The compiler
records each such input's range in the manifest signature (`index_range`,
inclusive), and every session checks feeds against it (runtime/reference.py
`check_feeds`), so all targets refuse the same ids the same way.
"""
from __future__ import annotations

from typing import Optional

from .graph import Graph, Value

# Ops that pass an integer tensor's values through unchanged (the ids reach a Gather through them).
_SAME_VALUES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Expand", "Transpose"}


def index_ranges(graph: Graph) -> dict[str, tuple[int, int]]:
    """{input name: (lowest, highest) valid value} for every graph input that reaches Gather indices."""
    ranges = {}
    for v in graph.inputs:
        if v.dtype is None or not v.dtype.is_integer:
            continue
        size = _smallest_gathered_axis(v, set())
        if size is not None:
            ranges[v.name] = (-size, size - 1)
    return ranges


def _smallest_gathered_axis(v: Value, seen: set) -> Optional[int]:
    sizes = []
    for node, i in v.uses:
        if node in seen:
            continue
        seen.add(node)
        if node.domain == "" and node.op_type == "Gather" and i == 1:
            data = node.inputs[0].shape
            if data is not None:
                axis = int(node.attrs.get("axis", 0))
                dim = data[axis if axis >= 0 else axis + len(data)]
                if isinstance(dim, int):
                    sizes.append(dim)
        elif node.domain == "" and node.op_type in _SAME_VALUES and i == 0:
            for out in node.outputs:
                size = _smallest_gathered_axis(out, seen)
                if size is not None:
                    sizes.append(size)
    return min(sizes, default=None)

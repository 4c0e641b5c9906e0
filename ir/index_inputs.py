"""Graph inputs used as indices (token ids): the range a feed must keep to.

A Gather index outside [-n, n) (n: the gathered axis's size) is an error in
ONNX, and a MoE hash-routing token id outside [0, rows of the table) is one in
polyport::MoE (ir/fused/moe.py), but a compiled kernel may wrap either or read
out of bounds. The compiler
records each such input's range in the manifest signature (`index_range`,
inclusive), and every session checks feeds against it (runtime/reference.py
`check_feeds`), so all targets refuse the same ids the same way.
"""
from __future__ import annotations

from .graph import Graph, Value
from .ops import POLYPORT_DOMAIN

MOE_TOKEN_IDS = 7      # polyport::MoE's token_ids operand (the hash table is the one before it)

# Ops that pass an integer tensor's values through unchanged (the ids reach a Gather through them).
_SAME_VALUES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Expand", "Transpose"}


def index_ranges(graph: Graph) -> dict[str, tuple[int, int]]:
    """{input name: (lowest, highest) valid value} for every graph input that reaches Gather indices
    or MoE hash-routing token ids."""
    ranges = {}
    for v in graph.inputs:
        if v.dtype is None or not v.dtype.is_integer:
            continue
        bounds = _index_bounds(v, set())
        if bounds:
            ranges[v.name] = (max(lo for lo, _ in bounds), min(hi for _, hi in bounds))
    return ranges


def _index_bounds(v: Value, seen: set) -> list[tuple[int, int]]:
    """The (lowest, highest) valid value of each index use `v` reaches."""
    bounds = []
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
                    bounds.append((-dim, dim - 1))
        elif node.domain == POLYPORT_DOMAIN and node.op_type == "MoE" and i == MOE_TOKEN_IDS:
            rows = node.inputs[MOE_TOKEN_IDS - 1].shape[0]
            if isinstance(rows, int):
                bounds.append((0, rows - 1))
        elif node.domain == "" and node.op_type in _SAME_VALUES and i == 0:
            for out in node.outputs:
                bounds += _index_bounds(out, seen)
    return bounds

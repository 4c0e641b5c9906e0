"""passes/derive_generation.py details that the end-to-end tests do not pin down."""
from __future__ import annotations

import numpy as np

from polyport.ir import dtypes
from polyport.ir.graph import Graph
from polyport.ir.types import TensorType
from polyport.passes.derive_generation import _max_positions


def test_max_positions_is_the_rows_of_a_constant_table_the_positions_index():
    g = Graph()
    n = g.add_input("n", TensorType(dtypes.I64, ()))
    arange = g.make_node("Range", [g.add_constant("zero", np.array(0)), n, g.add_constant("one", np.array(1))])
    shifted = g.make_node("Unsqueeze", [arange.outputs[0], g.add_constant("axis", np.array([0]))])
    g.make_node("Gather", [g.add_constant("cos_table", np.zeros((48, 8), np.float32)), shifted.outputs[0]])
    assert _max_positions([arange]) == 48
    g2 = Graph()
    r = g2.make_node("Range", [g2.add_constant("zero", np.array(0)), g2.add_input("n", TensorType(dtypes.I64, ())),
                               g2.add_constant("one", np.array(1))])
    g2.make_node("Cast", [r.outputs[0]], attrs={"to": 1})        # cos/sin computed from inv_freq: no limit
    assert _max_positions([r]) is None

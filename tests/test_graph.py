import numpy as np
import pytest

from polyport.ir import dtypes
from polyport.ir.graph import Graph
from polyport.ir.printer import format_graph
from polyport.ir.symbolic import sym
from polyport.ir.types import TensorType
from polyport.ir.verifier import VerificationError, verify


def _chain():
    g = Graph()
    x = g.add_input("x", TensorType(dtypes.F32, (1, sym("seq"), 4)))
    w = g.add_constant("w", np.ones((4, 4), np.float32))
    mm = g.make_node("MatMul", [x, w])
    relu = g.make_node("Relu", [mm.outputs[0]])
    g.set_outputs([relu.outputs[0]])
    return g, x, w, mm, relu


def test_use_lists_follow_every_edit():
    g, x, w, mm, relu = _chain()
    assert x.uses == ((mm, 0),)
    neg = g.make_node("Neg", [x], before=mm)
    mm.set_input(0, neg.outputs[0])
    assert x.uses == ((neg, 0),) and neg.outputs[0].uses == ((mm, 0),)
    verify(g)


def test_replace_all_uses_updates_graph_outputs():
    g, x, w, mm, relu = _chain()
    relu.outputs[0].replace_all_uses_with(mm.outputs[0])
    assert g.outputs == (mm.outputs[0],)
    assert g.remove_unused() == 1
    assert [n.op_type for n in g.nodes] == ["MatMul"]
    verify(g)


def test_remove_refuses_a_node_still_in_use():
    g, x, w, mm, relu = _chain()
    with pytest.raises(ValueError, match="still used"):
        g.remove(mm)


def test_nodes_is_a_snapshot_safe_to_mutate_while_iterating():
    g, x, w, mm, relu = _chain()
    for node in g.nodes:
        if node.op_type == "Relu":
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            g.remove(node)
    assert len(g) == 1


def test_sort_restores_topological_order():
    g, x, w, mm, relu = _chain()
    # Put Relu first by rebuilding the order by hand, then sort.
    g._nodes = dict.fromkeys([relu, mm])
    with pytest.raises(VerificationError, match="before it is defined"):
        verify(g)
    g.sort()
    assert [n.op_type for n in g.nodes] == ["MatMul", "Relu"]
    verify(g)


def test_printer_shows_symbolic_types():
    g, *_ = _chain()
    text = format_graph(g)
    assert "%x: f32[1, seq, 4]" in text
    assert "= MatMul(%x, %w)" in text

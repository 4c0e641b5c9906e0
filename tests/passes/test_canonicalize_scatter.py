"""canonicalize: a ScatterND that overwrites a contiguous run of rows becomes a Concat of slices,
and a Slice of whole Concat operands becomes those operands; other scatters stay."""
import numpy as np
import pytest
from onnx import helper

from polyport.passes.manager import PassManager
from polyport.runtime.reference import ReferenceSession


def N(op, ins, outs, **attrs):
    return helper.make_node(op, ins, [outs], **attrs)


def _run(g, seq=5):
    rng = np.random.default_rng(0)
    feeds = {v.name: rng.standard_normal([seq if d == "seq" or not isinstance(d, int) else d for d in v.type.shape])
             .astype(np.float32) for v in g.inputs}
    return feeds, ReferenceSession(g).run(feeds)


def _ops(g):
    return sorted(n.op_type for n in g.nodes)


@pytest.mark.parametrize("start,count", [(0, 6), (0, 4), (2, 3), (4, 2)])
def test_row_run_scatter_becomes_concat(build, start, count):
    idx = np.arange(start, start + count, dtype=np.int64).reshape(-1, 1)
    nodes = [N("ScatterND", ["d", "idx", "u"], "y"), N("Relu", ["y"], "out")]
    g = build(nodes, {"d": [6, "seq"], "u": [count, "seq"]}, ["out"], {"idx": idx})
    feeds, want = _run(g)
    PassManager(["canonicalize"]).run(g)
    assert "ScatterND" not in _ops(g)
    np.testing.assert_array_equal(ReferenceSession(g).run(feeds)["out"], want["out"])


def test_two_scatters_over_zeros_leave_one_concat(build):
    """The exporters' `k = zeros; k[:4] = a; k[4:] = b`: the zeros and both scatters go."""
    nodes = [N("ScatterND", ["z", "i0", "a"], "t"), N("ScatterND", ["t", "i1", "b"], "y")]
    g = build(nodes, {"a": [4, "seq"], "b": [2, "seq"], "z": [6, "seq"]}, ["y"],
              {"i0": np.arange(4).reshape(-1, 1), "i1": np.arange(4, 6).reshape(-1, 1)})
    feeds, want = _run(g)
    PassManager(["canonicalize"]).run(g)
    assert _ops(g) == ["Concat"], _ops(g)
    assert [v.name for v in g.nodes[0].inputs] == ["a", "b"]
    np.testing.assert_array_equal(ReferenceSession(g).run(feeds)["y"], want["y"])


@pytest.mark.parametrize("idx", [[[0], [2]], [[3], [2]], [[0, 1]], [[1], [1]]],
                         ids=["gap", "descending", "element", "repeated"])
def test_other_scatters_stay(build, idx):
    idx = np.array(idx, np.int64)
    u_shape = [len(idx), "seq"] if idx.shape[1] == 1 else [len(idx)]
    g = build([N("ScatterND", ["d", "idx", "u"], "y")], {"d": [6, "seq"], "u": u_shape}, ["y"], {"idx": idx})
    PassManager(["canonicalize"]).run(g)
    assert "ScatterND" in _ops(g)

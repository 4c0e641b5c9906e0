"""runtime/host_io.py and targets/fresh_outputs.py: the cpu session hands feeds to the VM without a copy
(aligned, or copied aligned first) and a kernel's fresh output back without one, and never gives the
caller memory it does not own: an output that is a weight, a constant, a feed or another output comes
back as the caller's own array."""
from __future__ import annotations

import itertools

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import polyport.backend.cpu as backend
from polyport.runtime.host_io import ALIGN


def _aliasing_model():
    """Outputs that TVM may return as the very buffer of a weight (w_flat), of the feed (x_out), or
    twice over (y, y2)."""
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    shape = numpy_helper.from_array(np.array([6], np.int64), "shape")
    one = numpy_helper.from_array(np.array(1, np.float32), "one")
    nodes = [helper.make_node("Reshape", ["w", "shape"], ["w_flat"]),
             helper.make_node("Identity", ["x"], ["x_out"]),
             helper.make_node("Add", ["x", "one"], ["y"]),
             helper.make_node("Identity", ["y"], ["y2"])]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 3])],
                              [vi("w_flat", TensorProto.FLOAT, [6]), vi("x_out", TensorProto.FLOAT, [2, 3]),
                               vi("y", TensorProto.FLOAT, [2, 3]), vi("y2", TensorProto.FLOAT, [2, 3])],
                              initializer=[w, shape, one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_results_never_alias_weights_feeds_or_each_other():
    rep = backend.prepare(_aliasing_model())
    x = np.full((2, 3), 5, np.float32)
    outs = rep.run([x])
    for a, b in itertools.combinations([x, *outs], 2):
        assert not np.shares_memory(a, b)
    # y is a kernel's own output buffer, handed out as a view (no copy); the others are copies
    assert [o.flags.owndata for o in outs] == [True, True, False, True]
    for o in outs:                       # the caller owns its results: writing them changes nothing else
        o[...] = -1
    w_flat, x_out, y, y2 = rep.run([x])
    np.testing.assert_array_equal(w_flat, np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(x, 5)
    np.testing.assert_array_equal(x_out, 5)
    np.testing.assert_array_equal(y, 6)
    np.testing.assert_array_equal(y2, 6)


def test_results_outlive_later_calls():
    """A result stays what it was when later calls run."""
    rep = backend.prepare(_aliasing_model())
    first = rep.run([np.full((2, 3), 1, np.float32)])[2]
    for v in range(2, 6):
        rep.run([np.full((2, 3), v, np.float32)])
    np.testing.assert_array_equal(first, 2)


def test_misaligned_and_read_only_feeds():
    rep = backend.prepare(_aliasing_model())
    raw = np.zeros(6 + ALIGN, np.float32)
    start = next(i for i in range(1, ALIGN) if raw[i:].ctypes.data % ALIGN)
    misaligned = raw[start:start + 6].reshape(2, 3)
    misaligned[...] = 3
    read_only = np.full((2, 3), 4, np.float32)
    read_only.flags.writeable = False
    for x, want in ((misaligned, 4), (read_only, 5)):
        y = rep.run([x])[2]
        np.testing.assert_array_equal(y, want)

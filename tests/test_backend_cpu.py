"""`polyport.backend.cpu` beyond the conformance suite: build-time operands bound from the feeds, 0-d
inputs, and the errors for what the cpu target cannot lower (never a silent fallback)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import polyport.backend.cpu as backend
from polyport import errors


def _model(nodes, inputs, outputs, opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_reduction_axes_input_is_bound_per_value():
    m = _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
               [_vi("x", TensorProto.FLOAT, [2, 3]), _vi("axes", TensorProto.INT64, [1])],
               [_vi("y", TensorProto.FLOAT, None)])
    rep = backend.prepare(m)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for axis in (0, 1, 0):       # a new value rebuilds; a seen one reuses its build
        (y,) = rep.run([x, np.array([axis], np.int64)])
        np.testing.assert_allclose(y, x.sum(axis=axis))
    assert len(rep.session._builds) == 2


def test_scalar_inputs_stay_scalar():
    m = _model([helper.make_node("Mul", ["a", "b"], ["c"])],
               [_vi("a", TensorProto.FLOAT, []), _vi("b", TensorProto.FLOAT, [])], [_vi("c", TensorProto.FLOAT, [])])
    (c,) = backend.run_model(m, [np.array(3, np.float32), np.array(4, np.float32)])
    assert c.shape == () and c == 12


def test_op_without_lowering_fails_prepare_naming_the_node():
    m = _model([helper.make_node("Det", ["x"], ["y"], name="det0")],
               [_vi("x", TensorProto.FLOAT, [3, 3])], [_vi("y", TensorProto.FLOAT, [])])
    with pytest.raises(errors.UnsupportedOpError, match=r"node det0 \(Det\): no lowering"):
        backend.prepare(m)


def test_unsupported_dtype_is_refused_naming_node_op_and_dtype():
    m = _model([helper.make_node("Log", ["x"], ["y"], name="log0")],
               [_vi("x", TensorProto.INT32, [4])], [_vi("y", TensorProto.INT32, [4])])
    with pytest.raises(errors.UnsupportedOpError, match=r"node log0 \(Log\).*dtype i32"):
        backend.prepare(m)


def test_opset12_softmax_coerces_to_2d():
    """Softmax before opset 13 normalises over all dims from `axis` on, not over `axis` alone."""
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=1)],
               [_vi("x", TensorProto.FLOAT, [2, 3, 4])], [_vi("y", TensorProto.FLOAT, [2, 3, 4])], opset=12)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    (y,) = backend.run_model(m, [x])
    e = np.exp(x.reshape(2, 12) - x.reshape(2, 12).max(1, keepdims=True))
    np.testing.assert_allclose(y, (e / e.sum(1, keepdims=True)).reshape(2, 3, 4), rtol=1e-5)


def test_bool_equal():
    """TVM's LLVM codegen compares i1 as a float (module verification fails); Equal on bool is lowered as not-xor."""
    m = _model([helper.make_node("Equal", ["a", "b"], ["c"])],
               [_vi("a", TensorProto.BOOL, [4]), _vi("b", TensorProto.BOOL, [4])], [_vi("c", TensorProto.BOOL, [4])])
    a, b = np.array([True, True, False, False]), np.array([True, False, True, False])
    (c,) = backend.run_model(m, [a, b])
    np.testing.assert_array_equal(c, a == b)

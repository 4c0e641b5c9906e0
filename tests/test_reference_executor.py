"""Regression tests for reference-executor fixes found by the ONNX backend suite (tests/conformance)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import polyport
from polyport import errors
from polyport.runtime.reference import ReferenceSession


def _model(nodes, inputs, outputs, opset=18, initializers=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_numpy_scalar_feeds_a_0d_input_but_python_scalars_do_not():
    m = _model([helper.make_node("Add", ["x", "y"], ["z"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, []),
                helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [])])
    s = ReferenceSession(polyport.import_onnx(m))
    out = s.run({"x": np.float32(1.5), "y": np.array(2.0, np.float32)})["z"]
    assert isinstance(out, np.ndarray) and out.shape == () and out == 3.5
    with pytest.raises(errors.InputError, match="dtype"):
        s.run({"x": np.float64(1.5), "y": np.array(2.0, np.float32)})   # still checked
    with pytest.raises(errors.InputError, match="NumPy array"):
        s.run({"x": 1.5, "y": np.array(2.0, np.float32)})


def test_if_body_reads_an_outer_constant_and_returns_an_outer_value():
    then = helper.make_graph([helper.make_node("Add", ["x", "c"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([], "else", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])])
    m = _model([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
               [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
               initializers=[onnx.numpy_helper.from_array(np.array([10, 20], np.float32), "c")])
    s = ReferenceSession(polyport.import_onnx(m))
    x = np.array([1, 2], np.float32)
    np.testing.assert_array_equal(s.run({"cond": np.array(True), "x": x})["y"], [11, 22])
    np.testing.assert_array_equal(s.run({"cond": np.array(False), "x": x})["y"], [1, 2])


def test_an_unknown_element_type_is_an_import_error():
    m = _model([helper.make_node("Identity", ["x"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m.graph.output[0].type.tensor_type.elem_type = 99   # no such TensorProto.DataType
    with pytest.raises(errors.ImportError_, match="element type 99"):
        polyport.import_onnx(m)


@pytest.mark.parametrize("data_shape, indices, axis", [
    ((4, 6), [[5, 0], [-1, 2]], 1),                  # shorter than the data along axis 0
    ((1, 3, 8), [[[7, 1], [0, -8], [3, 3]]], -1),   # dynamo's top-k over routed experts' scores
    ((5, 3), [[4, 0], [1, 2], [-5, 3]], 0),          # shorter along axis 1, gathering along 0
    ((2, 3, 4), [[[1], [0]]], 1),                    # shorter along axes 0 and 2
    ((3, 4), [[1, 2, -1, 0], [0, 0, 0, 0], [2, 2, 1, 1]], 0),   # same shape: onnx.reference agrees
])
def test_gather_elements_with_indices_shorter_than_the_data_matches_onnxruntime(data_shape, indices, axis):
    """The spec sets the output shape to the indices' shape on every axis; onnx.reference raises
    'all dimensions of index and self should be the same size' unless they match the data's."""
    ort = pytest.importorskip("onnxruntime")
    idx = np.array(indices, np.int64)
    m = _model([helper.make_node("GatherElements", ["d", "i"], ["o"], axis=axis)],
               [helper.make_tensor_value_info("d", TensorProto.FLOAT, list(data_shape)),
                helper.make_tensor_value_info("i", TensorProto.INT64, list(idx.shape))],
               [helper.make_tensor_value_info("o", TensorProto.FLOAT, list(idx.shape))])
    feeds = {"d": np.random.default_rng(0).standard_normal(data_shape).astype(np.float32), "i": idx}
    (want,) = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ReferenceSession(polyport.import_onnx(m), check_types=True).run(feeds)["o"]
    np.testing.assert_array_equal(got, want)

"""Quantized ONNX models as users bring them: MatMulNBits (ORT's quantizer) imports as
polyport::QuantMatMul, whose reference must compute what ONNX Runtime computes."""
from __future__ import annotations

import numpy as np
import pytest

from polyport import errors
from polyport.frontend.onnx_import import import_onnx
from polyport.ir.fused.quant import dequantize
from polyport.ir.quant_layout import quantize
from polyport.passes.pipelines import run_pipeline
from polyport.runtime.reference import ReferenceSession

from .quant_models import count_ops, dq_node_model, matmul_nbits, nbits_node_model, ort_exact, qdq
from .real_models import assert_logits_close, ort_run, token_ids


@pytest.mark.parametrize("block,symmetric", [(32, False), (128, True)])
def test_matmul_nbits_model_reference_matches_ort(tmp_path, block, symmetric):
    path = matmul_nbits("llama_a", block, symmetric, tmp_path)
    g = import_onnx(path)
    quantized = count_ops(path, "MatMulNBits")
    assert quantized > 0
    assert sum(n.qualified_op == "polyport::QuantMatMul" for n in g.nodes) == quantized
    assert not any(v.const.dtype == np.float32 and v.const.size >= 64 * 64 for v in g.constants.values()
                   if any(n.qualified_op == "polyport::QuantMatMul" for n, _ in v.uses))
    feeds = token_ids(12)
    got = ReferenceSession(g).run(feeds)[g.outputs[0].name]
    assert_logits_close(got, ort_run(path, feeds)[0])


@pytest.mark.parametrize("bits,K,block,zero_points,bias", [
    (4, 64, 32, True, True), (4, 80, 32, True, False), (4, 64, 128, False, True), (8, 48, 16, True, False),
    (8, 64, 32, False, True)])
def test_matmul_nbits_node_matches_ort(bits, K, block, zero_points, bias):
    """Ragged last blocks (K=80, block 32; K=64, block 128), 8 bits, with and without zero points and bias."""
    model = nbits_node_model(bits, K, 16, block, zero_points, bias)
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    got = ReferenceSession(import_onnx(model)).run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,bits,zero_points", [("uint8", 4, False), ("uint8", 4, True), ("uint8", 8, False),
                                                   ("int4", 4, False), ("uint4", 4, True)])
def test_gather_block_quantized_node_matches_ort(tmp_path, dtype, bits, zero_points):
    """GatherBlockQuantized as ORT runs it: uint8 tables holding two 4-bit codes (bits=4) or one, typed
    int4 / uint4 tables, implied and explicit zero points (explicit ones here differ from the implied:
    an f32 table), ragged last block (K = 40, block 16)."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    n, k, block = 24, 40, 16
    kb = -(-k // block)
    top = 2 ** bits
    codes = rng.integers(-top // 2 if dtype == "int4" else 0, top // 2 if dtype == "int4" else top, (n, k))
    if dtype == "uint8" and bits == 4:
        data = numpy_helper.from_array(((codes[:, 0::2] & 15) | ((codes[:, 1::2] & 15) << 4)).astype(np.uint8), "data")
    elif dtype in ("int4", "uint4"):
        data = numpy_helper.from_array(codes.astype(getattr(ml_dtypes, dtype)), "data")
    else:
        data = numpy_helper.from_array(codes.astype(np.uint8), "data")
    inits = [data, numpy_helper.from_array((rng.random((n, kb)) * 0.1).astype(np.float32), "scales")]
    if zero_points:
        zp = rng.integers(0, top, (n, kb))
        if dtype == "uint4":
            inits.append(numpy_helper.from_array(zp.astype(ml_dtypes.uint4), "zp"))
        else:
            inits.append(numpy_helper.from_array(((zp[:, 0::2] & 15) | ((np.pad(zp, ((0, 0), (0, kb % 2)))[:, 1::2] & 15) << 4))
                                                 .astype(np.uint8) if bits == 4 else zp.astype(np.uint8), "zp"))
    node = helper.make_node("GatherBlockQuantized", ["data", "ids", "scales"] + (["zp"] if zero_points else []), ["y"],
                            domain="com.microsoft", block_size=block, bits=bits, gather_axis=0, quantize_axis=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, k])], inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, tmp_path / "gbq.onnx")
    ids = rng.integers(0, n, (2, 3)).astype(np.int64)
    got = ReferenceSession(import_onnx(tmp_path / "gbq.onnx")).run({"ids": ids})["y"]
    want = ort_exact(tmp_path / "gbq.onnx", {"ids": ids})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gather_block_quantized_unsupported_bits_is_one_clear_error():
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node("GatherBlockQuantized", ["data", "ids", "scales"], ["y"], domain="com.microsoft",
                            block_size=16, bits=2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 16])],
                              [numpy_helper.from_array(np.zeros((8, 8), np.uint8), "data"),
                               numpy_helper.from_array(np.ones((8, 1), np.float32), "scales")])
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(errors.UnsupportedOpError, match=r"GatherBlockQuantized.*bits=2"):
        import_onnx(model)


def test_matmul_nbits_unsupported_bits_is_one_clear_error():
    model = nbits_node_model()
    for a in model.graph.node[0].attribute:
        if a.name == "bits":
            a.i = 2
    with pytest.raises(errors.UnsupportedOpError, match=r"MatMulNBits.*bits=2"):
        import_onnx(model)


@pytest.mark.parametrize("scheme,group,step", [("int8", 32, 1 / 127), ("int4", 32, 1 / 7), ("int4", 128, 1 / 7),
                                               ("fp8", 32, 1 / 16)])
def test_quantize_roundtrip_error_is_bounded_by_the_group_scale(scheme, group, step):
    w = np.random.default_rng(2).standard_normal((200, 24)).astype(np.float32)     # K=200: a ragged last group
    q = quantize(w, scheme, group)
    assert q.qweight.shape == ((24, 100) if scheme == "int4" else (24, 200))
    assert q.scales.shape == (24, -(-200 // group))
    back = dequantize(q.qweight, q.scales, q.zeros, **q.attrs).T
    amax = np.repeat(np.abs(np.pad(w, ((0, -200 % group), (0, 0)))).reshape(-1, group, 24).max(1), group, 0)[:200]
    # integer codes: half a step of max|w| per group; e4m3: 3 mantissa bits, relative 1/16
    bound = amax * step / 2 + 1e-7 if scheme != "fp8" else np.abs(w) * step + amax * 2.0 ** -9 / 448 * 2
    assert np.all(np.abs(back - w) <= bound + 1e-6)


# ---- DequantizeLinear (opset 21+) feeding MatMul / Gemm -------------------------------------------
def test_qdq_model_becomes_quant_matmul_and_matches_ort(tmp_path):
    path = qdq("llama_a", 32, False, tmp_path)
    g = import_onnx(path)
    assert sum(n.op_type == "DequantizeLinear" for n in g.nodes) == count_ops(path, "DequantizeLinear") > 0
    run_pipeline(g)
    assert not any(n.op_type in ("DequantizeLinear", "MatMul") for n in g.nodes)
    assert sum(n.qualified_op == "polyport::QuantMatMul" for n in g.nodes) == count_ops(path, "DequantizeLinear")
    feeds = token_ids(12)
    assert_logits_close(ReferenceSession(g).run(feeds)[g.outputs[0].name], ort_exact(path, feeds)[0])


@pytest.mark.parametrize("kind", ["int4", "uint4", "int8", "fp8", "int4_gemm", "fp8_gemm"])
def test_dequantize_linear_weights_become_quant_matmul(kind):
    """int4 / uint4 (with zero points) / e4m3fn blocks, int8 per channel, MatMul and Gemm (transB, bias):
    QuantMatMul computes what onnx.reference's DequantizeLinear -> MatMul computes."""
    model = dq_node_model(kind)
    x = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    g = import_onnx(model)
    want = ReferenceSession(g).run({"x": x})["y"]
    run_pipeline(g)
    assert [n.qualified_op for n in g.nodes] == ["polyport::QuantMatMul"]
    np.testing.assert_allclose(ReferenceSession(g).run({"x": x})["y"], want, rtol=1e-5, atol=1e-5)

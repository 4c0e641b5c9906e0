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

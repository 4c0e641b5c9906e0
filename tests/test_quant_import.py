"""Quantized ONNX models as users bring them: MatMulNBits (ORT's quantizer) imports as
polyport::QuantMatMul, whose reference must compute what ONNX Runtime computes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from polyport import errors
from polyport.frontend.onnx_import import import_onnx
from polyport.ir.fused.quant import dequantize
from polyport.ir.quant_layout import quantize
from polyport.runtime.reference import ReferenceSession

from .quant_models import count_ops, matmul_nbits
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


def _nbits_model(bits=4, K=64, N=16, block=32, zero_points=True, bias=True):
    rng = np.random.default_rng(0)
    kb = -(-K // block)
    b = rng.integers(0, 256, size=(N, kb, block * bits // 8), dtype=np.uint8)
    inits = [helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, [N * kb], rng.uniform(0.01, 0.1, N * kb))]
    ins = ["x", "B", "scales", "zp" if zero_points else "", "", "bias" if bias else ""]
    if zero_points:
        zp = rng.integers(0, 256, size=(N, -(-kb * bits // 8)), dtype=np.uint8)
        inits.append(helper.make_tensor("zp", TensorProto.UINT8, zp.shape, zp.tobytes(), raw=True))
    if bias:
        inits.append(helper.make_tensor("bias", TensorProto.FLOAT, [N], rng.standard_normal(N)))
    while not ins[-1]:
        ins.pop()
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", N])], inits)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits,K,block,zero_points,bias", [
    (4, 64, 32, True, True), (4, 80, 32, True, False), (4, 64, 128, False, True), (8, 48, 16, True, False),
    (8, 64, 32, False, True)])
def test_matmul_nbits_node_matches_ort(bits, K, block, zero_points, bias):
    """Ragged last blocks (K=80, block 32; K=64, block 128), 8 bits, with and without zero points and bias."""
    model = _nbits_model(bits, K, 16, block, zero_points, bias)
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    got = ReferenceSession(import_onnx(model)).run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_matmul_nbits_unsupported_bits_is_one_clear_error():
    model = _nbits_model()
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

"""Weights exported as low-bit codes times block scales (DeepSeek-V3's FP8 checkpoints) on the cpu target:
against ONNX Runtime running the same file, and 1 byte per weight (plus scales) in the artifact."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

import polyport.runtime.session as session  # noqa: E402
from polyport.compiler import compile_model  # noqa: E402
from polyport.frontend.onnx_import import import_onnx  # noqa: E402
from polyport.passes.pipelines import run_pipeline  # noqa: E402
from polyport.runtime import safetensors  # noqa: E402

from ..fp8_models import deepseek_v3_fp8, linear_model  # noqa: E402
from ..real_models import assert_logits_close, ort_run, token_ids  # noqa: E402


def test_block_scaled_and_unrecognised_layers_on_cpu_match_ort(tmp_path):
    """fp8 128x128 blocks under MatMul and Gemm (QuantMatMul's e4m3 kernel, K-blocks of 128) and a layer whose
    codes are decoded at run time (a scale per element)."""
    path = tmp_path / "fp8.onnx"
    onnx.save(linear_model(("unrecognised", "matmul", "gemm")), path)
    sess = session.load(compile_model(path, ["cpu"], tmp_path / "art", generation=False), "cpu")
    for rows in (1, 13):
        x = np.random.default_rng(rows).standard_normal((rows, 200)).astype(np.float32)
        assert_logits_close(sess.run({"x": x})["y"], ort_run(path, {"x": x})[0], rel=1e-5)


@pytest.mark.slow
def test_deepseek_v3_fp8_export_on_cpu_matches_ort(tmp_path):
    """A tiny DeepSeek-V3 whose linear and expert weights are FP8 with 128x128 block scales, as its checkpoint
    holds them, exported by torch.onnx.export: every linear a QuantMatMul or a projection of a quantized
    GatedMLP (the dense MLP and the shared expert fuse through their QuantMatMuls), the routed experts a
    quantized MoE, the logits ONNX Runtime's within 1e-4, the codes 1 byte each in the artifact."""
    path = deepseek_v3_fp8(tmp_path)
    g = import_onnx(path)
    run_pipeline(g)
    ops = [n.qualified_op for n in g.nodes]
    (moe,) = [n for n in g.nodes if n.qualified_op == "polyport::MoE"]
    mlps = [n for n in g.nodes if n.qualified_op == "polyport::GatedMLP"]
    assert all(m.attrs["format"] == "fp8e4m3" and m.attrs["block_size"] == 128 for m in mlps)
    assert ops.count("polyport::QuantMatMul") + 3 * len(mlps) == 16 and ops.count("MatMul") == 1   # + the f32 LM head
    assert not any(v is not None and v.dtype.name == "f8e4m3" for n in g.nodes for v in n.inputs)
    assert moe.attrs["format"] == "fp8e4m3" and moe.attrs["block_size"] == 128

    art = compile_model(path, ["cpu"], tmp_path / "art", generation=False)
    sess = session.load(art, "cpu")
    for seq in (1, 12):
        feeds = token_ids(seq)
        assert_logits_close(sess.run(feeds)["logits"], ort_run(path, feeds)[0])

    codes = [i for i in onnx.load(path).graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    weights = safetensors.load(art / "weights.safetensors")
    assert sum(w.size for w in weights.values() if w.itemsize == 1) == sum(int(np.prod(c.dims)) for c in codes)
    smallest = min(int(np.prod(c.dims)) for c in codes)
    large_f32 = sorted(w.shape for w in weights.values() if w.dtype == np.float32 and w.size >= smallest)
    assert large_f32 == [(256, 256), (256, 256)], large_f32       # the embedding and the LM head (kept f32)

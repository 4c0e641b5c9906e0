"""Half-precision compute (`compile --dtype f16|bf16` on cuda and rocm; passes/compute_dtype.py).

The cuda and rocm targets lower the 16-bit graph with the portable kernel set. No GPU is needed to check
what it computes: the cpu target builds the same lowering for LLVM (`compute=` with `kernels="portable"`)
and is compared with the reference executor on the f32 export, within the dtype's tolerance
(passes/region.py: f16 2e-2, bf16 6.25e-2 x max|logit|; measured on the corpus: f16 ~1e-3, bf16 ~1e-2).
Generation runs the same way with 16-bit KV caches. The GPU builds of the 16-bit graph are
checked like every GPU build (tests/targets/test_gpu_build.py: device code per arch, kernel names).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import polyport
from polyport import errors
from polyport.compiler import compile_model
from polyport.frontend.onnx_import import import_onnx
from polyport.ir import dtypes
from polyport.passes.compute_dtype import set_compute_dtype
from polyport.passes.pipelines import run_pipeline
from polyport.passes.region import tolerance
from polyport.runtime.reference import ReferenceSession
from polyport.targets.base import CompileOptions

from ..real_models import assert_logits_close, corpus, model_path
from .test_gpu_build import _device_module, _require

# MoE (softmax; sigmoid + groups), absorbed-MLA-able attention, DeepSeek V4's hyper-connections and CSA/HCA,
# sinks + sliding window + biased experts, soft-capping, LayerNorm + Gelu (standard ops kept f32 / 16-bit)
SLOW = ["mixtral_a", "deepseek_v4_a", "gpt_oss_a", "starcoder2_a"]
# A 16-bit hidden state moves a router's scores by its rounding; where the f32 reference's top-k gap is smaller
# (these random-weight exports at seq 33: 5e-5 .. 1e-4 x the top score) a token takes another expert, as it
# would on a GPU, and its logits move by 8e-2 .. 9e-2 x max|logit| (glm4_moe_a bf16 at seq 1: its groups' tie)
NEAR_TIED_ROUTERS = {("deepseek_v4_c", "f16"), ("glm4_moe_a", "bf16"), ("hunyuan_v1_moe_a", "f16"),
                     ("hunyuan_v1_moe_a", "bf16")}


def portable(dtype: str) -> CompileOptions:
    return CompileOptions(dtype=dtype, compute=dtype, extra={"kernels": "portable"})


def check_logits(name: str, dtype: str, tmp_path, seqs=(1, 33)) -> None:
    art = compile_model(model_path(name), ["cpu"], tmp_path / f"{name}.{dtype}", options=portable(dtype),
                        generation=False)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["compute"]["dtype"] == dtype and manifest["targets"]["cpu"]["dtype"] == dtype
    assert manifest["model"]["outputs"][0]["dtype"] == "f32"           # the signature does not change
    ref = ReferenceSession(import_onnx(model_path(name)))
    sess = polyport.load(art, "cpu")
    vocab = corpus()[name]["vocab_size"]
    for seq in seqs:
        ids = np.random.default_rng(seq).integers(0, vocab, size=(1, seq), dtype=np.int64)
        want = next(iter(ref.run({"input_ids": ids}).values()))
        got = sess.run({"input_ids": ids})[sess.output_names[0]]
        assert got.dtype == np.float32
        assert_logits_close(got, want, rel=tolerance(dtypes.from_name(dtype)))


def test_activations_are_16_bit_where_precision_allows():
    """Weights and the residual stream in bf16; rotary tables (from positions), the MoE router and the logits f32."""
    g = import_onnx(model_path("mixtral_a"))
    run_pipeline(g)
    entry = set_compute_dtype(g, "bf16")
    assert entry["dtype"] == "bf16" and entry["accumulation"] == "f32" and entry["tolerance"] == 0.0625
    by_op = {}
    for n in g.nodes:
        by_op.setdefault(n.qualified_op, []).append(n)
    for rot in by_op["polyport::Rotary"]:
        assert str(rot.inputs[0].dtype) == "bf16" and str(rot.inputs[1].dtype) == str(rot.inputs[2].dtype) == "f32"
    for moe in by_op["polyport::MoE"]:
        assert [str(moe.inputs[i].dtype) for i in (0, 1, 3, 4, 5)] == ["bf16", "f32", "bf16", "bf16", "bf16"]
    for mm in by_op["MatMul"]:
        assert str(mm.inputs[0].dtype) == str(mm.inputs[1].dtype) == "bf16"
    (logits,) = g.outputs
    assert logits.name == "logits" and str(logits.dtype) == "f32" and logits.producer.op_type == "Cast"


def test_f32_ops_read_f32():
    """DeepSeek V4's hyper-connection Softmax / ReduceSum run on f32 copies of 16-bit values."""
    g = import_onnx(model_path("deepseek_v4_a"))
    run_pipeline(g)
    entry = set_compute_dtype(g, "f16")
    assert entry["kept_f32"]["Softmax"] > 0 and entry["kept_f32"]["ReduceSum"] > 0
    for n in g.nodes:
        if n.op_type in ("Softmax", "ReduceSum"):
            assert str(n.inputs[0].dtype) == "f32" and str(n.outputs[0].dtype) == "f32"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_llama_in_half_precision_matches_the_reference(dtype, tmp_path):
    check_logits("llama_a", dtype, tmp_path, seqs=(1, 17))


def test_targets_computing_in_different_dtypes_need_separate_artifacts(tmp_path):
    with pytest.raises(errors.PolyportError, match=r"--dtype bf16: the targets compute in different dtypes "
                                                   r"\(cpu in f32, cuda in bf16\); compile them into separate"):
        compile_model(model_path("llama_a"), ["cpu", "cuda"], tmp_path / "a", options=CompileOptions(dtype="bf16"))
    with pytest.raises(errors.PolyportError, match="cpu target: f16 activations need the portable kernel set"):
        compile_model(model_path("llama_a"), ["cpu"], tmp_path / "b", options=CompileOptions(dtype="f16", compute="f16"))
    with pytest.raises(errors.PolyportError, match="--dtype f16 and --quantize int4 exclude each other"):
        from polyport.passes.quantize_weights import WeightQuantization
        compile_model(model_path("llama_a"), ["cuda"], tmp_path / "c", options=CompileOptions(dtype="f16"),
                      quantization=WeightQuantization("int4"))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_matches_the_reference(name, dtype, tmp_path):
    check_logits(name, dtype, tmp_path)


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(set(corpus()) - set(SLOW) - {"llama_a"}))
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_matches_the_reference_on_the_corpus(name, dtype, tmp_path, request):
    if (name, dtype) in NEAR_TIED_ROUTERS:
        request.applymarker(pytest.mark.xfail(reason="a near-tied MoE router picks another expert in 16-bit",
                                              strict=False))
    check_logits(name, dtype, tmp_path)


@pytest.mark.parametrize("name,dtype,kind", [
    pytest.param("llama_a", "bf16", "mha", marks=pytest.mark.slow),
    pytest.param("deepseek_v3_a", "bf16", "mla", marks=pytest.mark.corpus),     # absorbed MLA from 16-bit weights
    pytest.param("mixtral_a", "f16", "mha", marks=pytest.mark.corpus)])          # the decode MoE GEMVs
def test_generation_decodes_through_16_bit_caches(name, dtype, kind, tmp_path):
    """Teacher-forced decode through the 16-bit prefill/decode programs (portable kernels, caches in `dtype`,
    half the bytes of f32) matches the reference executor's full forward within the dtype's tolerance."""
    art = compile_model(model_path(name), ["cpu"], tmp_path / "art", options=portable(dtype))
    manifest = json.loads((art / "manifest.json").read_text())
    layers = manifest["generation"]["layers"]
    assert layers and all(layer["dtype"] == dtype and layer["kind"] == kind for layer in layers)
    s = polyport.load(art, "cpu")
    assert all(a.dtype.itemsize == 2 for a in (np.asarray(t.numpy()) for t in s.new_cache(1, 8).values()))
    ref = ReferenceSession(import_onnx(model_path(name)))
    ids = np.random.default_rng(3).integers(0, corpus()[name]["vocab_size"], size=(1, 20), dtype=np.int64)
    want = next(iter(ref.run({"input_ids": ids}).values()))[0]
    rel = tolerance(dtypes.from_name(dtype))
    state = s.start(ids[:, :7])
    assert state.cached
    assert_logits_close(state.logits[0], want[6], rel=rel)
    for t in range(7, 19):
        assert_logits_close(state.append(ids[:, t])[0], want[t], rel=rel)


@pytest.mark.slow
@pytest.mark.parametrize("target,kind,dtype", [("cuda", "cuda", "bf16"), ("rocm", "hip", "f16")])
def test_half_precision_gpu_builds_carry_device_code(target, kind, dtype, tmp_path):
    """llama_a in 16-bit, with its prefill/decode (16-bit caches): device code for each default arch whose kernels
    are those the built module calls."""
    _require(target)
    out = compile_model(model_path("llama_a"), [target], tmp_path / "art", options=CompileOptions(dtype=dtype))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["targets"][target]
    assert entry["dtype"] == dtype and manifest["compute"]["dtype"] == dtype and "quantization" not in manifest
    assert entry["programs"] == ["prefill", "decode"]
    for arch, lib in entry["libraries"].items():
        dev = _device_module(out / lib, kind)
        assert sorted(dev.kernels) == entry["kernels"][arch]
        assert {"cached_attention_partial_kernel", "cache_update_kernel"} <= set(dev.kernels)


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(corpus()))
@pytest.mark.parametrize("target,kind,dtype,arch", [("cuda", "cuda", "f16", "sm_90"), ("rocm", "hip", "bf16", "gfx942")])
def test_half_precision_gpu_builds_on_the_corpus(name, target, kind, dtype, arch, tmp_path):
    """Every corpus export (with its prefill/decode where it has them) builds in 16-bit for one arch."""
    _require(target)
    out = compile_model(model_path(name), [target], tmp_path / "art", options=CompileOptions(dtype=dtype, archs=(arch,)))
    entry = json.loads((out / "manifest.json").read_text())["targets"][target]
    assert entry["dtype"] == dtype
    assert sorted(_device_module(out / entry["libraries"][arch], kind).kernels) == entry["kernels"][arch]

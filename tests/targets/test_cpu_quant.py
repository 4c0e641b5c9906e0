"""QuantMatMul on the cpu target: the dequantize-in-register kernel against the reference, and
MatMulNBits models (ORT's own quantizer) against ONNX Runtime running the same quantized file."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")

import polyport.runtime.session as session  # noqa: E402
from polyport.compiler import compile_model  # noqa: E402
from polyport.frontend.onnx_import import import_onnx  # noqa: E402
from polyport.ir.fused.quant import dequantize  # noqa: E402
from polyport.ir.quant_layout import quantize, to_float16  # noqa: E402
from polyport.targets.kernels.cpu.quant_gemm import quant_dense_func  # noqa: E402
from polyport.runtime.cpu_session import _pack  # noqa: E402
from polyport.runtime.reference import ReferenceSession  # noqa: E402

from ..quant_models import dq_node_model, matmul_nbits  # noqa: E402
from ..real_models import assert_logits_close, corpus, model_path, ort_run, token_ids  # noqa: E402


@pytest.mark.parametrize("scheme,fmt,K,block,zeros", [
    ("int4", "uint", 80, 32, True), pytest.param("int4", "int", 64, 128, False, marks=pytest.mark.slow),
    pytest.param("int8", "uint", 48, 16, True, marks=pytest.mark.slow), ("fp8", "fp8e4m3", 96, 64, False),
    ("bf16", "bf16", 96, 96, False)])
def test_quant_dense_kernel_matches_reference(scheme, fmt, K, block, zeros):
    rng = np.random.default_rng(0)
    N, NB = 48, 16
    w32 = rng.standard_normal((K, N)).astype(np.float32)
    q = to_float16(w32, scheme) if scheme == "bf16" else quantize(w32, scheme, block)
    if fmt == "uint":                       # MatMulNBits' unsigned codes with per-block zeros
        q.format = "uint"
        if q.bits == 8:
            q.qweight = q.qweight.view(np.uint8)
    if zeros:
        q.zeros = rng.integers(0, 2 ** q.bits, q.scales.shape).astype(np.float32)
    w = dequantize(q.qweight, q.scales, q.zeros, **q.attrs)
    bias = rng.standard_normal(N).astype(np.float32)
    func = quant_dense_func(K, N // NB, NB, q.bits, block, q.format, zeros, True)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"}))
    none = np.zeros(1, np.float32)
    for m in (1, 7, 13):                     # below, at and past the row tile
        x = rng.standard_normal((m, K)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((m, N), np.float32))
        args = [x, _pack(q.qweight.T, NB), none if q.scales is None else _pack(q.scales.T, NB),
                _pack(q.zeros.T, NB) if zeros else none, bias]
        ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
        want = x @ w.T + bias
        assert np.abs(out.numpy() - want).max() <= 1e-5 * np.abs(want).max()


def _nbits_case(name, block, symmetric, marks=()):
    return pytest.param(name, block, symmetric, marks=list(marks), id=f"{name}-b{block}-{'sym' if symmetric else 'asym'}")


# The default run checks llama_a; `slow` adds an MoE model per block style. benchmarks/quant_corpus.py runs
# the whole corpus (every model but deepseek_v4_b, which does not build for cpu even in f32).
CASES = [_nbits_case("llama_a", 32, False), _nbits_case("qwen3_moe_a", 128, True, marks=[pytest.mark.slow]),
         _nbits_case("deepseek_v3_a", 32, False, marks=[pytest.mark.slow])]


@pytest.mark.parametrize("name,block,symmetric", CASES)
def test_matmul_nbits_model_on_cpu_matches_ort(tmp_path, name, block, symmetric):
    path = matmul_nbits(name, block, symmetric, tmp_path)
    art = compile_model(path, ["cpu"], tmp_path / "art", generation=False)     # run() only: no decode programs
    meta = json.loads((art / "cpu" / "model.json").read_text())
    assert meta["packed_rows"], "the quantized operands are bound column-blocked for the packed kernel"
    sess = session.load(art, "cpu")
    for seq in (1, 12):
        feeds = token_ids(seq, vocab=int(corpus()[name]["hf_config"]["vocab_size"]))
        got = sess.run(feeds)
        assert_logits_close(got[sess.output_names[0]], ort_run(path, feeds)[0])


@pytest.mark.parametrize("kind", ["uint4", "int8", "fp8_gemm"])
def test_dequantize_linear_model_on_cpu(tmp_path, kind):
    """DequantizeLinear -> MatMul / Gemm models compiled for cpu match onnx.reference's reading of them."""
    model = dq_node_model(kind)
    path = tmp_path / "dq.onnx"
    onnx.save(model, path)
    sess = session.load(compile_model(path, ["cpu"], tmp_path / "art"), "cpu")
    x = np.random.default_rng(5).standard_normal((13, 64)).astype(np.float32)
    want = ReferenceSession(import_onnx(path)).run({"x": x})["y"]
    assert_logits_close(sess.run({"x": x})["y"], want, rel=1e-5)


def _quantized_reference(name, spec):
    from polyport.passes.pipelines import run_pipeline
    from polyport.passes.quantize_weights import quantize_weights
    g = import_onnx(model_path(name))
    run_pipeline(g)
    quantize_weights(g, spec)
    return ReferenceSession(g)


@pytest.mark.parametrize("name,options", [
    pytest.param("llama_a", ["--quantize", "int4", "--group-size", "32"], marks=pytest.mark.slow),
    pytest.param("deepseek_v3_a", ["--quantize", "fp8", "--group-size", "128"], marks=pytest.mark.slow),
    pytest.param("qwen3_moe_a", ["--dtype", "bf16"], marks=pytest.mark.slow)])
def test_compiled_low_precision_matches_reference_on_its_weights(tmp_path, name, options):
    """`--quantize` / `--dtype` artifacts against the reference executor running the same graph on the
    dequantized (16-bit-rounded) weights: only the summation order differs, so fp32's 1e-4 holds."""
    from click.testing import CliRunner
    from polyport.cli import main
    from polyport.passes.quantize_weights import WeightQuantization
    from polyport.runtime import safetensors
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["compile", str(model_path(name)), "-t", "cpu", "-o", str(art),
                                    "--no-generation"] + options)
    assert res.exit_code == 0, res.output
    opts = dict(zip(options[::2], options[1::2]))
    scheme = opts.get("--quantize") or opts["--dtype"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme and manifest["quantization"]["weights"] > 0
    stored = safetensors.load(art / "weights.safetensors")
    codes = {n for n, a in stored.items() if a.dtype in (np.uint8, np.int8, np.uint16, np.float16) and a.ndim == 2}
    assert len(codes) == manifest["quantization"]["weights"]
    spec = WeightQuantization(scheme, int(opts.get("--group-size", 32)), lm_head="--dtype" in opts)
    ref = _quantized_reference(name, spec)
    sess = session.load(art, "cpu")
    for seq in (1, 12):
        feeds = token_ids(seq, vocab=int(corpus()[name]["hf_config"]["vocab_size"]))
        assert_logits_close(sess.run(feeds)[sess.output_names[0]], ref.run(feeds)[ref.output_names[0]])


@pytest.mark.parametrize("model", ["nbits", "fp8_gemm"])
def test_portable_quant_matmul_matches_reference(tmp_path, model):
    """The TE compute the GPU targets schedule with dlight, built for LLVM (weights as stored)."""
    from polyport.targets.base import CompileOptions
    from ..quant_models import nbits_node_model
    path = tmp_path / "m.onnx"
    onnx.save(nbits_node_model() if model == "nbits" else dq_node_model(model), path)
    art = compile_model(path, ["cpu"], tmp_path / "art", options=CompileOptions(extra={"kernels": "portable"}))
    assert json.loads((art / "cpu" / "model.json").read_text())["packed_rows"] == {}
    x = np.random.default_rng(6).standard_normal((9, 64)).astype(np.float32)
    want = ReferenceSession(import_onnx(path)).run({"x": x})["y"]
    assert_logits_close(session.load(art, "cpu").run({"x": x})["y"], want, rel=1e-5)

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
from polyport.targets.cpu import host_mcpu  # noqa: E402
from polyport.targets.kernels.cpu import int_dot, isa  # noqa: E402
from polyport.targets.kernels.cpu.quant_gemm import quant_dense_func  # noqa: E402
from polyport.runtime.cpu_session import _pack  # noqa: E402
from polyport.runtime.reference import ReferenceSession  # noqa: E402

from ..quant_models import count_ops, dq_node_model, matmul_nbits  # noqa: E402
from ..real_models import assert_logits_close, corpus, model_path, ort_run, token_ids  # noqa: E402


def _avx512() -> bool:
    from polyport.devices import host_cpu_info
    return "avx512f" in host_cpu_info()["flags"]


# AVX2 (8 lanes) in the default run; AVX-512 (16 lanes: other row tiles and column groups) with the slow
# tests, where the host runs it (the compiled models run it on such a host in the default run)
ISAS = [pytest.param("x86-64-v3", 8, id="avx2"),
        pytest.param("x86-64-v4", 16, id="avx512",
                     marks=[pytest.mark.slow, pytest.mark.skipif(not _avx512(), reason="the host has no AVX-512")])]


@pytest.mark.parametrize("mcpu,lanes", ISAS)
@pytest.mark.parametrize("scheme,fmt,K,block,zeros", [
    ("int4", "uint", 80, 32, True), pytest.param("int4", "int", 64, 128, False, marks=pytest.mark.slow),
    pytest.param("int8", "uint", 48, 16, True, marks=pytest.mark.slow), ("fp8", "fp8e4m3", 96, 64, False),
    ("bf16", "bf16", 96, 96, False)])
def test_quant_dense_kernel_matches_reference(scheme, fmt, K, block, zeros, mcpu, lanes):
    rng = np.random.default_rng(0)
    N, NB = 64, 16
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
    with isa.building_for(mcpu):              # its instructions (int_dot.py's byte dot products) too
        func = quant_dense_func(K, N // NB, NB, q.bits, block, q.format, zeros, True, lanes=lanes)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    none = np.zeros(1, np.float32)
    for m in (1, 3, 7, 13):                  # decode-time row tiles and their tails; prefill tiles and tails
        x = rng.standard_normal((m, K)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((m, N), np.float32))
        args = [x, _pack(q.qweight.T, NB), none if q.scales is None else _pack(q.scales.T, NB),
                _pack(q.zeros.T, NB) if zeros else none, bias]
        ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
        want = x @ w.T + bias
        assert np.abs(out.numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_quant_gemv_from_the_decode_threshold_runs_parallel():
    """A decode GEMV of PARALLEL_MIN_DECODE_MACS splits its column blocks over the threads at one row
    (decoding codes binds it) and still matches the dequantized weights."""
    from polyport.targets.kernels.cpu.parallel import PARALLEL_MIN_DECODE_MACS
    rng = np.random.default_rng(3)
    K, NB = 512, 16
    N = PARALLEL_MIN_DECODE_MACS // K
    q = quantize(rng.standard_normal((K, N)).astype(np.float32), "int4", 32)
    w = dequantize(q.qweight, q.scales, q.zeros, **q.attrs)
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()})
    with target:
        func = quant_dense_func(K, N // NB, NB, q.bits, 32, q.format, False, False)
    gemv = func.script().split("else:")[0]                     # the few-rows branch comes first
    assert "T.parallel" in gemv
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    none = np.zeros(1, np.float32)
    for m in (1, 2):
        x = rng.standard_normal((m, K)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((m, N), np.float32))
        args = [x, _pack(q.qweight.T, NB), _pack(q.scales.T, NB), none, none]
        ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
        want = x @ w.T
        assert np.abs(out.numpy() - want).max() <= 1e-5 * np.abs(want).max(), f"m={m}"


@pytest.mark.parametrize("scheme,fmt,K,block", [("int4", "int", 128, 32), ("int4", "uint", 256, 128),
                                                ("int4", "int", 96, 8), ("int8", "int", 128, 32),
                                                ("int8", "uint", 64, 16)])
def test_quant_gemv_as_byte_dot_products(scheme, fmt, K, block):
    """Where the host has VNNI and VBMI, an int4 / int8 GEMV (1 to 5 rows: tiles of two and a tail) runs as
    byte dot products over 24-bit block integers of x (int_dot.py) and matches the dequantized weights to
    f32 precision, including a block of zeros and one 1e4 times larger than the rest."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()})
    with target:
        if not isa.byte_dot():
            pytest.skip("the host has no AVX512-VNNI / VBMI")
        rng = np.random.default_rng(5)
        N, NB = 64, 16
        q = quantize(rng.standard_normal((K, N)).astype(np.float32), scheme, block)
        assert int_dot.usable(q.bits, fmt, False, block)
        if fmt == "uint":                       # the same values as unsigned codes centred on 2^(bits - 1)
            q.format, q.qweight = "uint", q.qweight.view(np.uint8) ^ np.uint8(0x88 if q.bits == 4 else 0x80)
        w = dequantize(q.qweight, q.scales, q.zeros, **q.attrs)
        func = quant_dense_func(K, N // NB, NB, q.bits, block, fmt, False, False)
    assert "vpdpbusd" in func.script()
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    none = np.zeros(1, np.float32)
    for m in (1, 2, 5):
        x = rng.standard_normal((m, K)).astype(np.float32)
        x[:, :block] = 0.0
        x[:, block:2 * block] *= 1e4
        out = tvm.runtime.tensor(np.zeros((m, N), np.float32))
        args = [x, _pack(q.qweight.T, NB), _pack(q.scales.T, NB), none, none]
        ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        assert np.abs(out.numpy() - want).max() <= 1e-6 * np.abs(want).max(), f"m={m}"


def _nbits_case(name, block, symmetric, marks=()):
    return pytest.param(name, block, symmetric, marks=list(marks), id=f"{name}-b{block}-{'sym' if symmetric else 'asym'}")


# The default run checks llama_a; `slow` adds an MoE model per block style; `corpus` every other corpus
# family in both block styles (benchmarks/quant_corpus.py prints the same matrix as a table).
_CHECKED = {("llama_a", 32), ("qwen3_moe_a", 128), ("deepseek_v3_a", 32)}
CASES = [_nbits_case("llama_a", 32, False), _nbits_case("llama_a", 32, True),
         _nbits_case("qwen3_moe_a", 128, True, marks=[pytest.mark.slow]),
         _nbits_case("deepseek_v3_a", 32, False, marks=[pytest.mark.slow])] + [
    _nbits_case(name, block, block == 128, marks=[pytest.mark.corpus]) for name in sorted(corpus())
    for block in (32, 128) if (name, block) not in _CHECKED]


@pytest.mark.parametrize("name,block,symmetric", CASES)
def test_matmul_nbits_model_on_cpu_matches_ort(tmp_path, name, block, symmetric):
    """ORT's own MatMulNBits quantizer's model against ORT; a symmetric one's MLPs fuse into quantized
    GatedMLPs over the same codes (passes/fuse_mlp.py), an asymmetric one's stay QuantMatMuls."""
    path = matmul_nbits(name, block, symmetric, tmp_path)
    if name == "llama_a":
        from polyport.passes.pipelines import run_pipeline
        g = import_onnx(path)
        run_pipeline(g)
        fused = [n for n in g.nodes if n.qualified_op == "polyport::GatedMLP"]
        assert bool(fused) == symmetric and all(n.attrs["bits"] == 4 for n in fused)
    art = compile_model(path, ["cpu"], tmp_path / "art", generation=False)     # run() only: no decode programs
    meta = json.loads((art / "cpu" / "model.json").read_text())
    assert meta["packed_rows"], "the quantized operands are bound column-blocked for the packed kernel"
    sess = session.load(art, "cpu")
    for seq in (1, 12):
        feeds = token_ids(seq, vocab=int(corpus()[name]["hf_config"]["vocab_size"]))
        got = sess.run(feeds)
        assert_logits_close(got[sess.output_names[0]], ort_run(path, feeds)[0])


@pytest.mark.parametrize("symmetric", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_gather_block_quantized_embeddings_match_ort(tmp_path, symmetric):
    """ORT's quantizer with Gather quantized too writes the embedding table as GatherBlockQuantized: a
    symmetric table imports as a QuantGather over the same codes, an asymmetric one (zero points) as an f32
    table; either way the cpu artifact matches ORT running the same file."""
    path = matmul_nbits("llama_a", 32, symmetric, tmp_path, gather=True)
    assert count_ops(path, "GatherBlockQuantized") == 1
    ops = {n.qualified_op for n in import_onnx(path).nodes}
    assert ("polyport::QuantGather" in ops) == symmetric
    sess = session.load(compile_model(path, ["cpu"], tmp_path / "art", generation=False), "cpu")
    feeds = token_ids(9, vocab=int(corpus()["llama_a"]["hf_config"]["vocab_size"]))
    assert_logits_close(sess.run(feeds)[sess.output_names[0]], ort_run(path, feeds)[0])


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


EMB = "--quantize-embeddings"


@pytest.mark.parametrize("name,options", [
    ("llama_a", ["--quantize", "int4", "--group-size", "32", EMB]),
    pytest.param("deepseek_v3_a", ["--quantize", "fp8", "--group-size", "128", EMB], marks=pytest.mark.slow),
    pytest.param("qwen3_moe_a", ["--quantize", "int4", "--group-size", "32"], marks=pytest.mark.slow),
    pytest.param("mixtral_a", ["--quantize", "int8", "--group-size", "64"], marks=pytest.mark.slow),
    pytest.param("gpt_oss_a", ["--quantize", "int4", "--group-size", "32"], marks=pytest.mark.slow),
    pytest.param("qwen3_moe_a", ["--dtype", "bf16", EMB], marks=pytest.mark.slow)])
def test_compiled_low_precision_matches_reference_on_its_weights(tmp_path, name, options):
    """`--quantize` / `--dtype` artifacts against the reference executor running the same graph on the
    dequantized (16-bit-rounded) weights: only the summation order differs, so fp32's 1e-4 holds. With
    --quantize-embeddings the table is stored as codes and only the gathered rows are decoded."""
    from click.testing import CliRunner
    from polyport.cli import main
    from polyport.passes.quantize_weights import WeightQuantization
    from polyport.runtime import safetensors
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["compile", str(model_path(name)), "-t", "cpu", "-o", str(art),
                                    "--no-generation"] + options)
    assert res.exit_code == 0, res.output
    emb = EMB in options
    opts = dict(zip(*[iter(o for o in options if o != EMB)] * 2))
    scheme = opts.get("--quantize") or opts["--dtype"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme and manifest["quantization"]["weights"] > 0
    assert manifest["quantization"]["embeddings"] == emb
    assert ("f32: embeddings" in manifest["quantization"]["layers"]) != emb
    params = json.loads((art / "cpu" / "model.json").read_text())["params"]
    table = "model.model.embed_tokens.weight"
    assert (table in params) != emb and any(p.startswith(table + "/") for p in params) == emb   # codes, as parameters
    stored = safetensors.load(art / "weights.safetensors")
    codes = {n for n, a in stored.items() if a.dtype in (np.uint8, np.int8, np.uint16, np.float16)}
    assert len(codes) == manifest["quantization"]["weights"]
    if "--quantize" in opts and corpus()[name].get("num_moe_layers"):      # experts quantized in the fused MoE
        assert any(a.ndim == 3 for n, a in stored.items() if n in codes)
        assert not any("f32: MoE" in k for k in manifest["quantization"]["layers"])
    spec = WeightQuantization(scheme, int(opts.get("--group-size", 32)), lm_head="--dtype" in opts, embeddings=emb)
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


def test_cpu_build_emits_the_quant_kernel_with_noalias_pointers():
    """A one-layer model's shape function sorts after its kernel; TVM's codegen gave every body the last
    declared function's no-alias flag, and the kernel, emitted without it, kept its accumulators in memory
    (targets/llvm_noalias.py). Its compute function is a separate one only when its pointers are no-alias."""
    import re
    from polyport.targets.base import CompileOptions, get_target
    from ..quant_models import nbits_node_model
    ex = get_target("cpu").build(import_onnx(nbits_node_model()), CompileOptions())[0]
    llvm = [m for m in ex.mod.imports if m.kind == "llvm"]
    ll = llvm[0].inspect_source("ll")
    compute = re.findall(r"define internal [^@]*@quant_dense\w*_compute_\((.*?)\) unnamed_addr", ll)
    assert compute and compute[0].count("noalias") >= 3, compute


@pytest.mark.parametrize("kernels", ["cpu", pytest.param("portable", marks=pytest.mark.slow)])
def test_quantized_gated_mlp_matches_reference(tmp_path, kernels):
    """--quantize keeps a GatedMLP fused over codes (K first): the cpu kernel over column-blocked codes and
    the portable compute over them as stored, against the reference on the dequantized weights."""
    from polyport.compiler import signature
    from polyport.ir import dtypes
    from polyport.ir.graph import Graph
    from polyport.ir.symbolic import sym
    from polyport.ir.types import TensorType
    from polyport.passes.quantize_weights import WeightQuantization, quantize_weights
    from polyport.runtime.artifact import ArtifactWriter
    from polyport.targets.base import CompileOptions, get_target
    rng = np.random.default_rng(0)
    g = Graph("mlp")
    x = g.add_input("x", TensorType(dtypes.F32, (sym("seq"), 64)))
    c = lambda name, *shape: g.add_constant(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))
    n = g.make_node("GatedMLP", [x, c("wg", 64, 48), c("wu", 64, 48), c("wd", 48, 64)], domain="polyport",
                    name="mlp", attrs={"activation": "gelu", "clamp": 2.0}, types=[x.type])
    g.set_outputs([n.outputs[0]])
    entry = quantize_weights(g, WeightQuantization("int4", 32, lm_head=True))
    assert entry["layers"] == {"GatedMLP": 1} and [m.op_type for m in g.nodes] == ["GatedMLP"]
    weights = {v.name: v.const for v in g.constants.values()}
    with ArtifactWriter(tmp_path / "art", signature(g, g.name)) as w:
        w.write_weights(weights)
        e = get_target("cpu").lower(g, w.target_dir("cpu"), weights, CompileOptions(extra={"kernels": kernels}))
        w.add_target("cpu", e)
        art = w.commit()
    packed = json.loads((art / "cpu" / "model.json").read_text())["packed"]
    assert (len(packed) == 6) == (kernels == "cpu")           # codes and scales column-blocked for the kernel
    sess = session.load(art, "cpu")
    for seq in (1, 9):
        xv = rng.standard_normal((seq, 64)).astype(np.float32)
        assert_logits_close(sess.run({"x": xv})[g.outputs[0].name], ReferenceSession(g).run({"x": xv})[g.outputs[0].name],
                            rel=1e-5)


def _tied_llama():
    """llama_a with its LM head tied to the embedding table, as a tied export imports: the LM head's weight a
    second constant equal to the table's transpose (the exporter's Transpose of the shared table, folded)."""
    from polyport.passes.pipelines import run_pipeline
    g = import_onnx(model_path("llama_a"))
    run_pipeline(g)
    table = next(n.inputs[0] for n in g.nodes if n.op_type == "Gather" and n.inputs[1] in g.inputs)
    head = [n for n in g.nodes if n.op_type == "MatMul"][-1]
    head.set_input(1, g.add_constant(g.unique_name("lm_head_t"), np.ascontiguousarray(table.const.T)))
    return g


@pytest.mark.parametrize("scheme", ["int4", pytest.param("bf16", marks=pytest.mark.slow)])
def test_tied_lm_head_and_embeddings_share_one_set_of_codes(tmp_path, scheme):
    """A quantized LM head tied to a quantized table reads the table's codes: stored once, bound column-blocked
    for the LM head's kernel, and the gather reads them so too, matching the reference."""
    from polyport.compiler import signature
    from polyport.passes.quantize_weights import WeightQuantization, quantize_weights
    from polyport.runtime import safetensors
    from polyport.runtime.artifact import ArtifactWriter
    from polyport.targets.base import CompileOptions, get_target
    g = _tied_llama()
    entry = quantize_weights(g, WeightQuantization(scheme, 32, lm_head=True, embeddings=True))
    assert entry["layers"]["LM head: the embedding table's codes"] == 1
    [gather] = [n for n in g.nodes if n.op_type == "QuantGather"]
    head = [n for n in g.nodes if n.op_type == "QuantMatMul"][-1]
    assert head.inputs[1:] == gather.inputs[1:]
    vocab, hidden = gather.attrs["N"], gather.attrs["K"]
    assert not [v for v in g.constants.values() if v.const.shape == (hidden, vocab)]          # no f32 LM head
    assert [v for v in g.constants.values() if v.const.ndim == 2 and v.const.shape[0] == vocab] \
        == [v for v in gather.inputs[1:] if v is not None]                  # no f32 table, no second codes
    weights = {v.name: v.const for v in g.constants.values()}
    with ArtifactWriter(tmp_path / "art", signature(g, g.name)) as w:
        w.write_weights(weights)
        w.add_target("cpu", get_target("cpu").lower(g, w.target_dir("cpu"), weights, CompileOptions()))
        art = w.commit()
    assert gather.inputs[1].name in json.loads((art / "cpu" / "model.json").read_text())["packed_rows"]
    stored = safetensors.load(art / "weights.safetensors")
    table_bytes = gather.inputs[1].const.nbytes
    assert sum(a.nbytes for a in stored.values()) < sum(v.nbytes for v in weights.values()) + table_bytes
    sess, ref = session.load(art, "cpu"), ReferenceSession(g)
    for seq in (1, 9):
        feeds = token_ids(seq)
        assert_logits_close(sess.run(feeds)[sess.output_names[0]], ref.run(feeds)[ref.output_names[0]])

"""Quantized weights on the ascend target: CANN's antiquant matmuls in the op plan (QuantMatMul ->
WeightQuantBatchMatmulV2, quantized MoE experts -> GroupedMatmul with antiquantScaleOptional), the codes
kept as INT4 / INT8 in model.onnx, the emulator's numerics against the reference on the dequantized
weights (fp16 tolerance, as test_ascend.py), and what CANN does not take falling back with a warning."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from polyport.ir import dtypes
from polyport.ir.graph import Graph
from polyport.ir.symbolic import sym
from polyport.ir.types import TensorType
from polyport.passes.quantize_weights import WeightQuantization, quantize_weights
from polyport.targets.ascend.limits import DEQUANT_TABLE, AscendFallbackWarning

from .test_ascend import TOL, _emulate_vs_reference, _lower


def _graph(kind: str) -> Graph:
    """x [seq, 64] -> MatMul over a [64, 48] weight ("dense"), a GatedMLP (I = 48, "mlp"), or a 4-expert MoE
    (H = I = 64, "moe"; with gpt-oss's biases, "moe_biased")."""
    rng = np.random.default_rng(0)
    g = Graph(kind)
    x = g.add_input("x", TensorType(dtypes.F32, (sym("seq"), 64)))
    c = lambda name, *shape: g.add_constant(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))
    if kind == "dense":
        n = g.make_node("MatMul", [x, c("w", 64, 48)], name="mm", types=[TensorType(dtypes.F32, (sym("seq"), 48))])
    elif kind == "mlp":
        n = g.make_node("GatedMLP", [x, c("wg", 64, 48), c("wu", 64, 48), c("wd", 48, 64)], domain="polyport",
                        name="mlp", attrs={"activation": "silu"}, types=[x.type])
    else:
        attrs = {"top_k": 2, "scoring": "softmax", "renormalize": 1}
        ins = [x, c("router", 64, 4), None, c("wg", 4, 64, 64), c("wu", 4, 64, 64), c("wd", 4, 64, 64)]
        if kind == "moe_biased":       # gpt-oss: router and expert biases (inputs 11-14), its activation
            ins += [None] * 5 + [c("rb", 4), c("bg", 4, 64), c("bu", 4, 64), c("bd", 4, 64)]
            attrs.update(alpha=1.702, up_offset=1.0, clamp=7.0)
        n = g.make_node("MoE", ins, domain="polyport", name="moe", attrs=attrs, types=[x.type])
    g.set_outputs([n.outputs[0]])
    return g


def _plan(art):
    return json.loads((art / "ascend" / "op_plan.json").read_text())["calls"]


@pytest.mark.parametrize("kind,scheme,op,antiquant_inputs", [
    ("dense", "int4", "WeightQuantBatchMatmulV2", 3),
    pytest.param("dense", "int8", "WeightQuantBatchMatmulV2", 3, marks=pytest.mark.slow),
    pytest.param("mlp", "int4", "WeightQuantBatchMatmulV2", 3, marks=pytest.mark.slow),
    ("moe", "int4", "GroupedMatmul", 4), ("moe_biased", "int4", "GroupedMatmul", 4)])
def test_antiquant_matmuls_take_the_codes(tmp_path, kind, scheme, op, antiquant_inputs):
    g = _graph(kind)
    quantize_weights(g, WeightQuantization(scheme, 32, lm_head=True))   # the MatMul is the output
    art, entry = _lower(g, tmp_path)
    assert not [f for f in entry["fallbacks"] if f["cann_op"] != "SwiGlu"]    # gpt-oss's activation: decomposed
    calls = [c for c in _plan(art) if c["op"] == op]
    assert calls and all(len([i for i in c["inputs"] if i]) >= antiquant_inputs for c in calls)
    assert all(i["dtype"] in ("int4", "int8") for c in calls for i in c["inputs"][1:2])   # codes, not floats
    model = onnx.load(str(art / "ascend" / "model.onnx"))
    code_type = onnx.TensorProto.INT4 if scheme == "int4" else onnx.TensorProto.INT8
    assert any(t.data_type == code_type for t in model.graph.initializer)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    assert _emulate_vs_reference(art, g, {"x": x}) <= TOL


@pytest.mark.parametrize("kind,scheme,limit", [
    pytest.param("dense", "fp8", "WeightQuantBatchMatmulV2 requires weight", marks=pytest.mark.slow),
    ("moe", "int8", "GroupedMatmul requires antiquant_weight")])
def test_what_antiquant_does_not_take_falls_back(tmp_path, kind, scheme, limit):
    """fp8 per block (A2's WeightQuantBatchMatmulV2 takes no FLOAT8) and int8 per group in a GroupedMatmul
    (per channel only): dequantized at compile time, recorded, still the reference's numbers."""
    g = _graph(kind)
    quantize_weights(g, WeightQuantization(scheme, 32, lm_head=True))   # the MatMul is the output
    with pytest.warns(AscendFallbackWarning, match=limit):
        art, entry = _lower(g, tmp_path)
    assert entry["fallbacks"]
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    assert _emulate_vs_reference(art, g, {"x": x}) <= TOL


@pytest.mark.parametrize("scheme,group,gathers", [("int4", 32, "int8"), ("fp8", 64, "float16")])
def test_quantized_embeddings_gather_codes_then_dequantize(tmp_path, scheme, group, gathers):
    """llama_a with --quantize-embeddings: the table stays codes (INT8 in model.onnx, int4 widened to one per
    byte) and only the gathered rows are scaled, in the model and in the decode program; fp8 (no FLOAT8 in
    opset 18) falls back to the table dequantized at compile time, recorded. The emulator's prefill and
    teacher-forced decode match the reference on the quantized graph."""
    import polyport
    from polyport.compiler import compile_model
    from polyport.runtime.reference import ReferenceSession
    from ..generation.conftest import prompt, quantized_graph
    from ..real_models import model_path
    spec = WeightQuantization(scheme, group, embeddings=True)
    art = compile_model(model_path("llama_a"), ["ascend"], tmp_path / "art", quantization=spec)
    fallbacks = json.loads((art / "manifest.json").read_text())["targets"]["ascend"]["fallbacks"]
    gathers_fell_back = {f["fallback"] for f in fallbacks if f["cann_op"] == "Gather"}
    assert gathers_fell_back == ({DEQUANT_TABLE} if scheme == "fp8" else set())
    for plan in ("op_plan.json", "decode.op_plan.json"):
        calls = [c for c in json.loads((art / "ascend" / plan).read_text())["calls"]
                 if c["from"] and c["from"]["op"] == "polyport::QuantGather"]
        assert calls[0]["op"] == "Gather" and calls[0]["inputs"][0]["dtype"] == gathers, plan
        assert calls[0]["inputs"][0]["shape"] == [256, 64]          # the whole table, not a row
    g = quantized_graph("llama_a", spec)
    ids = prompt("llama_a", 7, 4)
    want = ReferenceSession(g).run({g.inputs[0].name: ids})[g.outputs[0].name][0]
    state = polyport.load(art, target="ascend").start(ids[:, :7])
    errs = [np.abs(state.logits[0] - want[6]).max()] + \
        [np.abs(state.append(ids[:, 7 + t])[0] - want[7 + t]).max() for t in range(3)]
    assert max(errs) <= TOL * np.abs(want).max()

"""`--quantize`: which weights become QuantMatMul codes, and that the quantized graph stays close to f32."""
from __future__ import annotations

import numpy as np
import pytest

from polyport import errors
from polyport.frontend.onnx_import import import_onnx
from polyport.passes.pipelines import run_pipeline
from polyport.passes.quantize_weights import WeightQuantization, quantize_weights
from polyport.runtime.reference import ReferenceSession

from ..real_models import model_path, token_ids


def _graph(name="llama_a"):
    g = import_onnx(model_path(name))
    run_pipeline(g)
    return g


def _logits(g, seq=8):
    return ReferenceSession(g).run(token_ids(seq))[g.outputs[0].name]


@pytest.mark.parametrize("scheme,group,rel", [("int8", 32, 0.02), ("int4", 32, 0.3), ("int4", 128, 0.4),
                                              ("fp8", 64, 0.15)])
def test_quantized_llama_keeps_the_lm_head_and_stays_near_f32(scheme, group, rel):
    g = _graph()
    want = _logits(g)
    entry = quantize_weights(g, WeightQuantization(scheme, group))
    assert entry["scheme"] == scheme and entry["group_size"] == group
    assert entry["layers"] == {"GatedMLP": 2, "MatMul": 8, "f32: LM head": 1, "f32: embeddings": 1}
    ops = [n.qualified_op for n in g.nodes]
    assert ops.count("polyport::GatedMLP") == 2 and ops.count("MatMul") == 1 and ops.count("polyport::QuantMatMul") == 8
    assert all(n.attrs["bits"] for n in g.nodes if n.qualified_op == "polyport::GatedMLP")   # fused over codes
    codes = [n.inputs[1].const for n in g.nodes if n.qualified_op == "polyport::QuantMatMul"]
    assert all(c.dtype == (np.int8 if scheme == "int8" else np.uint8) for c in codes)
    got = _logits(g)
    # random weights make low precision look harsh; these bounds only catch a broken scheme
    assert np.abs(got - want).max() <= rel * np.abs(want).max()


def test_lm_head_is_quantized_behind_the_option_and_a_tied_weight_never():
    g = _graph()
    entry = quantize_weights(g, WeightQuantization("int8", 32, lm_head=True))
    assert entry["layers"].get("f32: LM head") is None and entry["layers"]["MatMul"] == 9
    assert not any(n.qualified_op == "MatMul" for n in g.nodes)


@pytest.mark.parametrize("scheme,group", [("int2", 32), ("int4", 48)])
def test_bad_quantization_options_are_one_clear_error(scheme, group):
    with pytest.raises(errors.PolyportError, match="--quantize int2|--group-size 48"):
        WeightQuantization(scheme, group)


def test_cost_model_counts_quantized_weights_at_their_stored_bytes():
    from polyport.runtime.cost import analyze, evaluate
    g = _graph()
    f32 = analyze(g)
    quantize_weights(g, WeightQuantization("int4", 32))
    q = analyze(g)
    # the same GEMM FLOPs; the unfused GatedMLP adds its elementwise ops (< 1%)
    flops = [evaluate(c.flops, {"seq": 128}) for c in (f32, q)]
    assert not q.unknown and flops[0] <= flops[1] <= 1.01 * flops[0]
    assert q.weight_bytes < f32.weight_bytes / 2


def test_16_bit_weights_and_quantized_codes_reach_the_fused_moe():
    g = _graph("qwen3_moe_a")
    want = _logits(g)
    entry = quantize_weights(g, WeightQuantization("f16", lm_head=True))
    assert entry["layers"]["MoE"] == 2
    moe = [n for n in g.nodes if n.qualified_op == "polyport::MoE"]
    assert all(n.inputs[i].const.dtype == np.float16 for n in moe for i in (1, 3, 4, 5))
    assert np.abs(_logits(g) - want).max() <= 5e-3 * np.abs(want).max()
    g = _graph("qwen3_moe_a")
    assert quantize_weights(g, WeightQuantization("int8", 32))["layers"]["MoE"] == 2
    assert all(n.inputs[3].const.dtype == np.int8 for n in g.nodes if n.qualified_op == "polyport::MoE")


def test_quantized_gpt_oss_experts_keep_their_biases():
    """Codes and scales at the MoE's inputs 8-10, gpt-oss's router and expert biases (11-14) still f32."""
    g = _graph("gpt_oss_a")
    want = _logits(g)
    quantize_weights(g, WeightQuantization("int8", 32))
    moe = [n for n in g.nodes if n.qualified_op == "polyport::MoE"]
    assert moe and all(n.attrs["bits"] == 8 and n.inputs[3].const.dtype == np.int8 for n in moe)
    assert all(n.inputs[i].const.dtype == np.float32 for n in moe for i in range(8, 15))
    assert np.abs(_logits(g) - want).max() <= 0.02 * np.abs(want).max()


@pytest.mark.parametrize("scheme,group,code_cols,rel", [("int4", 32, 32, 0.3), ("int8", 64, 64, 0.02),
                                                        ("bf16", 32, 64, 5e-3)])
def test_embeddings_are_quantized_behind_the_option(scheme, group, code_cols, rel):
    """The token embedding becomes a QuantGather over [vocab, hidden] codes (groups along hidden), which
    gathers exactly the rows of the dequantized table; the f32 table is gone."""
    from polyport.ir import fused
    from polyport.ir.fused.quant import dequantize
    g = _graph()
    table = next(n.inputs[0] for n in g.nodes if n.op_type == "Gather" and n.inputs[1] in g.inputs)
    vocab, hidden = table.const.shape
    want = _logits(g)
    entry = quantize_weights(g, WeightQuantization(scheme, group, embeddings=True))
    assert entry["embeddings"] and entry["layers"]["embeddings"] == 1 and "f32: embeddings" not in entry["layers"]
    [node] = [n for n in g.nodes if n.qualified_op == "polyport::QuantGather"]
    assert node.inputs[0] is g.inputs[0] and table.name not in g.constants
    codes = node.inputs[1].const
    assert codes.shape == (vocab, code_cols) and codes.dtype == {"int4": np.uint8, "int8": np.int8,
                                                                 "bf16": np.uint16}[scheme]
    if scheme != "bf16":
        assert node.inputs[2].const.shape == (vocab, -(-hidden // group))
    stored = [v.const for v in node.inputs[1:]] + [None] * (3 - len(node.inputs))
    full = dequantize(stored[0], stored[1], None, **node.attrs)
    ids = np.array([[3, vocab - 1, 0, -1]])
    np.testing.assert_array_equal(fused.evaluate("QuantGather", [ids] + stored[:2], **node.attrs), full[ids])
    assert np.abs(full - table.const).max() <= rel * np.abs(table.const).max()
    assert np.abs(_logits(g) - want).max() <= rel * np.abs(want).max()


def test_cost_model_reads_only_the_gathered_rows_of_a_quantized_table():
    """A step reads the rows it gathers, whether the table is f32 or codes: the weight bytes streamed per
    step are the same with or without --quantize-embeddings."""
    from polyport.runtime.cost import analyze
    sizes = []
    for embeddings in (False, True):
        g = _graph()
        quantize_weights(g, WeightQuantization("int8", 32, embeddings=embeddings))
        sizes.append(analyze(g).weight_bytes)
    assert sizes[0] == sizes[1]

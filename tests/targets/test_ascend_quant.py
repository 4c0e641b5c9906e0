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
from polyport.targets.ascend.limits import AscendFallbackWarning

from .test_ascend import TOL, _emulate_vs_reference, _lower


def _graph(kind: str) -> Graph:
    """x [seq, 64] -> MatMul over a [64, 48] weight ("dense"), a GatedMLP (I = 48, "mlp"), or a 4-expert MoE
    (H = I = 64, "moe")."""
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
        n = g.make_node("MoE", [x, c("router", 64, 4), None, c("wg", 4, 64, 64), c("wu", 4, 64, 64),
                                c("wd", 4, 64, 64)], domain="polyport", name="moe",
                        attrs={"top_k": 2, "scoring": "softmax", "renormalize": 1}, types=[x.type])
    g.set_outputs([n.outputs[0]])
    return g


def _plan(art):
    return json.loads((art / "ascend" / "op_plan.json").read_text())["calls"]


@pytest.mark.parametrize("kind,scheme,op,antiquant_inputs", [
    ("dense", "int4", "WeightQuantBatchMatmulV2", 3),
    pytest.param("dense", "int8", "WeightQuantBatchMatmulV2", 3, marks=pytest.mark.slow),
    pytest.param("mlp", "int4", "WeightQuantBatchMatmulV2", 3, marks=pytest.mark.slow),
    ("moe", "int4", "GroupedMatmul", 4)])
def test_antiquant_matmuls_take_the_codes(tmp_path, kind, scheme, op, antiquant_inputs):
    g = _graph(kind)
    quantize_weights(g, WeightQuantization(scheme, 32, lm_head=True))   # the MatMul is the output
    art, entry = _lower(g, tmp_path)
    assert not entry["fallbacks"]
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

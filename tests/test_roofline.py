"""The cost model (runtime/cost.py) on hand-built graphs, and the roofline's choice of bound."""
import numpy as np
import pytest

import polyport.ir.fused  # noqa: F401 - registers the fused ops
from polyport.ir import dtypes
from polyport.ir.graph import Graph
from polyport.ir.symbolic import parse, sym
from polyport.ir.types import TensorType
from polyport.runtime import roofline
from polyport.runtime.cost import analyze, graph_cost
from polyport.devices import DEVICES, TARGET_DEVICES, DeviceSpec

SEQ = sym("seq")
F32 = dtypes.F32


def matmul_graph(k: int = 64, n: int = 32) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (1, SEQ, k)))
    w = g.add_constant("w", np.ones((k, n), np.float32))
    mm = g.make_node("MatMul", [x, w], types=[TensorType(F32, (1, SEQ, n))])
    g.set_outputs(mm.outputs)
    return g


def attention_graph(causal: int) -> Graph:
    g = Graph()
    q = g.add_input("q", TensorType(F32, (1, 4, SEQ, 16)))
    k = g.add_input("k", TensorType(F32, (1, 2, SEQ, 16)))
    v = g.add_input("v", TensorType(F32, (1, 2, SEQ, 8)))
    att = g.make_node("Attention", [q, k, v], domain="polyport", types=[TensorType(F32, (1, 4, SEQ, 8))],
                      attrs={"num_heads": 4, "kv_heads": 2, "scale": 0.25, "causal": causal})
    g.set_outputs(att.outputs)
    return g


def moe_graph(tokens_dim=SEQ, hidden: int = 8, inter: int = 4, experts: int = 6, top_k: int = 2) -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType(F32, (1, tokens_dim, hidden)))
    router = g.add_constant("router", np.ones((hidden, experts), np.float32))
    wg = g.add_constant("wg", np.ones((experts, hidden, inter), np.float32))
    wu = g.add_constant("wu", np.ones((experts, hidden, inter), np.float32))
    wd = g.add_constant("wd", np.ones((experts, inter, hidden), np.float32))
    moe = g.make_node("MoE", [x, router, None, wg, wu, wd], domain="polyport", attrs={"top_k": top_k},
                      types=[TensorType(F32, (1, tokens_dim, hidden))])
    g.set_outputs(moe.outputs)
    return g


def test_matmul_cost_is_the_hand_computed_polynomial():
    cost = graph_cost(matmul_graph())
    # 2 * M * N * K with M = seq, N = 32, K = 64
    assert parse(cost["flops"]) == 2 * 32 * 64 * SEQ
    # weights read once (64*32 f32) + x in (seq*64 f32) + y out (seq*32 f32)
    assert cost["weight_bytes"] == 64 * 32 * 4
    assert parse(cost["bytes"]) == (64 + 32) * 4 * SEQ + 64 * 32 * 4
    assert cost["dtype"] == "f32" and cost["moe"] == [] and cost["unknown_nodes"] == 0


@pytest.mark.parametrize("causal", [0, 1])
def test_attention_cost_is_the_hand_computed_polynomial(causal):
    cost = graph_cost(attention_graph(causal))
    # 2 * B * H * S * Skv * (Dqk + Dv) = 2 * 1 * 4 * seq * seq * 24, halved when causal
    full = 2 * 4 * 24 * SEQ * SEQ
    assert parse(cost["flops"]) == (full // 2 if causal else full)
    # q (4*16) + k (2*16) + v (2*8) + out (4*8) f32 elements per token; no weights
    assert cost["weight_bytes"] == 0
    assert parse(cost["bytes"]) == (64 + 32 + 16 + 32) * 4 * SEQ


def test_moe_cost_and_touched_experts():
    cost = graph_cost(moe_graph())
    # tokens * top_k * 3 * H * I * 2 + router 2 * tokens * H * E
    assert parse(cost["flops"]) == SEQ * 2 * 3 * 8 * 4 * 2 + 2 * SEQ * 8 * 6
    (m,) = cost["moe"]
    assert (m["top_k"], m["experts"], m["expert_bytes"]) == (2, 6, 3 * 8 * 4 * 4)
    assert cost["weight_bytes"] == 8 * 6 * 4          # only the router; experts are counted per use
    act = 2 * 8 * 4 * SEQ                              # x in, y out
    # one token touches its 2 experts; 16 tokens routed uniformly touch 6 (1 - (4/6)^16) = 5.99 of the 6
    for seq, touched in ((1, 2), (16, 6 * (1 - (4 / 6) ** 16))):
        expect = act.evaluate({"seq": seq}) + 8 * 6 * 4 + round(touched * m["expert_bytes"])
        assert roofline.total_bytes(cost, {"seq": seq}) == expect
    assert roofline.total_bytes(cost, {"seq": 16}) < act.evaluate({"seq": 16}) + 8 * 6 * 4 + 6 * m["expert_bytes"]


def test_unknown_shapes_are_counted_not_guessed():
    g = Graph()
    x = g.add_input("x", TensorType(F32, None))
    w = g.add_constant("w", np.ones((4, 4), np.float32))
    mm = g.make_node("MatMul", [x, w])
    g.set_outputs(mm.outputs)
    c = analyze(g)
    assert c.unknown == [mm.name] and c.flops == 0


def test_roofline_picks_the_bound():
    cost = graph_cost(matmul_graph())
    bindings = roofline.bind(cost, 128)
    assert bindings == {"seq": 128}
    flops = 2 * 32 * 64 * 128
    nbytes = 96 * 4 * 128 + 64 * 32 * 4
    fast_math = DeviceSpec("fast math", {"f32": 1e15}, memory_bandwidth=1e9, memory_bytes=1)
    est = roofline.estimate(cost, fast_math, bindings)
    assert (est.flops, est.bytes, est.bound) == (flops, nbytes, "memory")
    assert est.latency_s == pytest.approx(nbytes / 1e9)
    fast_memory = DeviceSpec("fast memory", {"f32": 1e9}, memory_bandwidth=1e15, memory_bytes=1)
    est = roofline.estimate(cost, fast_memory, bindings)
    assert est.bound == "compute" and est.latency_s == pytest.approx(flops / 1e9)


def test_roofline_without_cost_is_a_clear_error():
    from polyport.errors import PolyportError
    with pytest.raises(PolyportError, match="no cost model"):
        roofline.estimate(None, DEVICES["h200"], {"seq": 1})


def test_devices_are_complete():
    for key in ("h100", "h200", "mi300x", "910b3", "cpu"):
        d = DEVICES[key]
        assert d.peak("f32") > 0 and d.peak("bf16") >= d.peak("f32") and d.memory_bandwidth > 0 and d.notes
    assert DEVICES["h200"].memory_bandwidth > DEVICES["h100"].memory_bandwidth
    assert "ESTIMATE" in DEVICES["cpu"].notes
    assert TARGET_DEVICES["cuda"] == ("h100", "h200")


def test_quantized_experts_and_their_scales_are_counted_per_chosen_expert():
    from polyport.passes.quantize_weights import WeightQuantization, quantize_weights
    g = moe_graph(hidden=64, inter=32)
    quantize_weights(g, WeightQuantization("int4", 32))
    (m,) = graph_cost(g)["moe"]
    # per expert: gate and up [64, 32], down [32, 64] as int4 codes (half a byte each) + one f32 scale per
    # 32 k per column; only the f32 router [64, 6] is read whatever the routing
    codes, scales = 3 * 64 * 32 // 2, (2 * 2 * 32 + 1 * 64) * 4
    assert m["expert_bytes"] == codes + scales
    assert graph_cost(g)["weight_bytes"] == 64 * 6 * 4


def test_a_batched_decode_step_reads_the_weights_once_and_every_sequence_s_cache():
    from polyport.runtime.bench import tpot_bytes
    cost = graph_cost(moe_graph())
    generation = {"layers": [{"bytes_per_token": 10}, {"bytes_per_token": 6, "capacity": 50}]}
    (m,) = cost["moe"]
    router, act = 8 * 6 * 4, 2 * 8 * 4                 # act: x in, y out per token
    # batch 1: 2 experts, 100 + 50 cached tokens; batch 8: the 6 (1 - (4/6)^8) = 5.77 experts 8 tokens touch
    # (not min(6, 8 x 2) = 6: a batch rarely reads every expert), 8 caches
    assert tpot_bytes(cost, generation, 100) == router + act + 2 * m["expert_bytes"] + 100 * 10 + 50 * 6
    assert tpot_bytes(cost, generation, 100, batch=8) == \
        router + 8 * act + round(6 * (1 - (4 / 6) ** 8) * m["expert_bytes"]) + 8 * (100 * 10 + 50 * 6)

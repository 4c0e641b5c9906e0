"""fuse-rmsnorm: every spelling the exports use becomes polyport::RMSNorm; near misses stay, with a reason."""
import numpy as np
import pytest
from onnx import TensorProto, helper

H = 8
EPS = 1e-5
W = np.linspace(0.5, 1.5, H).astype(np.float32)


def N(op, ins, outs, **attrs):
    return helper.make_node(op, ins, [outs] if isinstance(outs, str) else outs, **attrs)


def consts(**extra):
    base = {"two": np.float32(2.0), "eps": np.float32(EPS), "one": np.float32(1.0), "w": W,
            "last": np.array([-1], np.int64), "half": np.float32(-0.5)}
    return {**base, **extra}


SQUARE = {"pow": [N("Pow", ["x", "two"], "sq")], "mul": [N("Mul", ["x", "x"], "sq")]}
RSQRT = {  # from "var" to "n" = x * rsqrt(var)
    "reciprocal": [N("Sqrt", ["var"], "sd"), N("Reciprocal", ["sd"], "r"), N("Mul", ["x", "r"], "n")],
    "div_one": [N("Sqrt", ["var"], "sd"), N("Div", ["one", "sd"], "r"), N("Mul", ["r", "x"], "n")],
    "pow_half": [N("Pow", ["var", "half"], "r"), N("Mul", ["x", "r"], "n")],
    "div_x": [N("Sqrt", ["var"], "sd"), N("Div", ["x", "sd"], "n")],
}


def norm_nodes(square="pow", rsqrt="reciprocal", mean_axes="last", keepdims=1, eps="eps"):
    return SQUARE[square] + [N("ReduceMean", ["sq", mean_axes], "ms", keepdims=keepdims),
                             N("Add", ["ms", eps], "var")] + RSQRT[rsqrt]


@pytest.mark.parametrize("square", sorted(SQUARE))
@pytest.mark.parametrize("rsqrt", sorted(RSQRT))
@pytest.mark.parametrize("weight_side", ["left", "right"])
def test_spellings(fuse, build, square, rsqrt, weight_side):
    scale = N("Mul", ["w", "n"] if weight_side == "left" else ["n", "w"], "y")
    f = fuse(lambda: build(norm_nodes(square, rsqrt) + [scale], {"x": [1, "seq", H]}, ["y"], consts()),
             "fuse-rmsnorm")
    assert f.counts == {"RMSNorm": 1} and f.ops == {"polyport::RMSNorm": 1}
    node = f.node("RMSNorm")
    assert node.attrs == {"epsilon": EPS}
    assert node.inputs[0] is f.graph.inputs[0] and node.inputs[1].name == "w"


def test_fp16_with_casts_to_fp32_and_back(fuse, build):
    """HF: x.to(fp32) -> normalise -> .to(fp16) -> weight *. The norm reads the fp16 x directly."""
    nodes = [N("Cast", ["x16"], "x", to=TensorProto.FLOAT)] + norm_nodes() + [
        N("Cast", ["n"], "n16", to=TensorProto.FLOAT16), N("Mul", ["w16", "n16"], "y")]
    f = fuse(lambda: build(nodes, {"x16": [1, "seq", H]}, ["y"], consts(w16=W.astype(np.float16)),
                           dtype=TensorProto.FLOAT16), "fuse-rmsnorm", atol=1e-2)
    node = f.node("RMSNorm")
    assert f.ops == {"polyport::RMSNorm": 1}
    assert node.inputs[0] is f.graph.inputs[0] and node.inputs[1].dtype.name == "f16"


def test_gemma_one_plus_weight_is_a_folded_weight(fuse, build):
    """(1 + w) is folded by canonicalize, so the RMSNorm's weight is the constant 1 + w: meaning explicit."""
    nodes = norm_nodes() + [N("Add", ["one", "w"], "w1"), N("Mul", ["n", "w1"], "y")]
    f = fuse(lambda: build(nodes, {"x": [1, "seq", H]}, ["y"], consts()), "fuse-rmsnorm")
    np.testing.assert_allclose(f.node("RMSNorm").inputs[1].const, 1 + W)


def test_weight_with_leading_ones_becomes_1d(fuse, build):
    nodes = norm_nodes() + [N("Mul", ["n", "w3"], "y")]
    f = fuse(lambda: build(nodes, {"x": [1, "seq", H]}, ["y"], consts(w3=W.reshape(1, 1, H))), "fuse-rmsnorm")
    assert f.node("RMSNorm").inputs[1].shape == (H,)


def test_weightless_norm_gets_ones(fuse, build):
    """DeepSeek-V4's mHC and per-head q norms have no weight: RMSNorm(x, ones)."""
    nodes = norm_nodes() + [N("MatMul", ["n", "proj"], "y")]
    f = fuse(lambda: build(nodes, {"x": [1, 2, "seq", H]}, ["y"], consts(proj=np.eye(H, 3, dtype=np.float32))),
             "fuse-rmsnorm")
    w = f.node("RMSNorm").inputs[1]
    assert w.const is not None and w.shape == (H,) and (w.const == 1).all()


def test_reduce_mean_axes_attribute_opset13(fuse, build):
    nodes = [N("Pow", ["x", "two"], "sq"), N("ReduceMean", ["sq"], "ms", axes=[2], keepdims=1),
             N("Add", ["ms", "eps"], "var")] + RSQRT["reciprocal"] + [N("Mul", ["n", "w"], "y")]
    f = fuse(lambda: build(nodes, {"x": [1, "seq", H]}, ["y"], consts(), opset=13), "fuse-rmsnorm")
    assert f.counts == {"RMSNorm": 1}


# ---- near misses: no fusion, and a note that says why --------------------------------------------------

def _missed(fuse, build, nodes, shape=(1, "seq", H), **extra):
    f = fuse(lambda: build(nodes, {"x": list(shape)}, ["y"], consts(**extra)), "fuse-rmsnorm")
    assert not f.counts and "polyport::RMSNorm" not in f.ops
    assert len(f.notes) == 1, f.notes
    return f.notes[0]


def test_mean_over_a_non_last_axis(fuse, build):
    note = _missed(fuse, build, norm_nodes(mean_axes="ax1") + [N("Mul", ["n", "w"], "y")],
                   shape=(1, 4, H), ax1=np.array([1], np.int64))
    assert "not the last axis" in note


def test_eps_not_a_scalar(fuse, build):
    note = _missed(fuse, build, norm_nodes(eps="eps_h") + [N("Mul", ["n", "w"], "y")],
                   eps_h=np.full(H, EPS, np.float32))
    assert "eps is not a scalar" in note


def test_mean_without_keepdims(fuse, build):
    nodes = norm_nodes(keepdims=0)[:3] + [N("Unsqueeze", ["var", "last"], "var1"), N("Sqrt", ["var1"], "sd"),
                                          N("Reciprocal", ["sd"], "r"), N("Mul", ["x", "r"], "n"),
                                          N("Mul", ["n", "w"], "y")]
    note = _missed(fuse, build, nodes)
    assert "mean of a square, but" in note


def test_square_of_another_value(fuse, build):
    nodes = [N("Pow", ["x2", "two"], "sq")] + norm_nodes()[1:] + [N("Mul", ["n", "w"], "y")]
    f = fuse(lambda: build(nodes, {"x": [1, "seq", H], "x2": [1, "seq", H]}, ["y"], consts()), "fuse-rmsnorm")
    assert not f.counts and len(f.notes) == 1 and "mean of a square, but" in f.notes[0]


def test_rsqrt_used_elsewhere(fuse, build):
    nodes = norm_nodes() + [N("Mul", ["n", "w"], "y0"), N("Add", ["y0", "r"], "y")]
    note = _missed(fuse, build, nodes)
    assert "used outside" in note


# ---- the real exports ----------------------------------------------------------------------------------

def expected_rmsnorms(entry) -> tuple[int, int]:
    """(all RMSNorms, weightless ones) from the HF config."""
    cfg, family = entry["hf_config"], entry["family"]
    layers = cfg["num_hidden_layers"]
    weighted = 2 * layers + 1                             # input + post-attention norms per layer; final norm
    weightless = 0
    if family == "qwen3_moe":
        weighted += 2 * layers                            # q_norm, k_norm (per head)
    elif family == "deepseek_v3":
        weighted += (1 + (cfg.get("q_lora_rank") is not None)) * layers   # kv_a_layernorm (+ q_a_layernorm)
    elif family == "deepseek_v4":
        weighted += 2 * layers                            # q_a_norm, kv_norm
        weighted += sum({"heavily_compressed_attention": 1,       # the compressor's kv_norm
                         "compressed_sparse_attention": 2}.get(t, 0)   # + the indexer's
                        for t in cfg.get("layer_types", ()))
        weightless += layers                              # per-head q norm (q_b_norm)
        if cfg.get("hc_mult", 1) > 1:                     # mHC: before attention, before the FFN; the head
            weightless += 2 * layers + 1
    return weighted + weightless, weightless


def test_real_model(real_model, real_name):
    model = real_model(real_name)
    want, want_weightless = expected_rmsnorms(model.entry)
    norms = model.fused("RMSNorm")
    assert len(norms) == want, model.notes("fuse-rmsnorm")
    assert sum(n.inputs[1].const is not None and bool((n.inputs[1].const == 1).all()) for n in norms) \
        == want_weightless
    eps = model.entry["hf_config"]["rms_norm_eps"]
    assert {n.attrs["epsilon"] for n in norms} == {eps}
    assert "ReduceMean" not in model.ops           # no norm left behind
    assert all(err <= 1e-4 for err in model.rel_err.values()), model.rel_err

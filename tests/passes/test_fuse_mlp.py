"""fuse-gated-mlp: down(act(gate(x)) * up(x)) becomes polyport::GatedMLP; MoE experts and near misses stay."""
import math

import numpy as np
import pytest
from onnx import helper

H, I = 8, 12
RNG = np.random.default_rng(0)
WG, WU, WD = (RNG.standard_normal(s).astype(np.float32) * 0.3 for s in ((H, I), (H, I), (I, H)))


def N(op, ins, outs, **attrs):
    return helper.make_node(op, ins, [outs] if isinstance(outs, str) else outs, **attrs)


def f32(v):
    return np.float32(v)


CONSTS = {"wg": WG, "wu": WU, "wd": WD, "wgT": WG.T.copy(), "wuT": WU.T.copy(), "wdT": WD.T.copy(),
          "wgu": np.concatenate([WG, WU], 1), "half": f32(0.5), "one": f32(1.0), "sqrt2": f32(math.sqrt(2)),
          "k": f32(0.044715), "c": f32(math.sqrt(2 / math.pi)), "three": f32(3.0), "L": f32(7.0), "mL": f32(-7.0),
          "split": np.array([I, I], np.int64), "i0": np.array([0], np.int64), "iI": np.array([I], np.int64),
          "i2I": np.array([2 * I], np.int64), "ax": np.array([-1], np.int64), "s1": np.array([1], np.int64),
          "q": f32(1.702)}

ACT = {  # "g" -> "a"
    "silu": [N("Sigmoid", ["g"], "sg"), N("Mul", ["g", "sg"], "a")],
    "gelu": [N("Mul", ["g", "half"], "gh"), N("Div", ["g", "sqrt2"], "gs"), N("Erf", ["gs"], "ge"),
             N("Add", ["ge", "one"], "g1"), N("Mul", ["gh", "g1"], "a")],
    "gelu_tanh": [N("Pow", ["g", "three"], "g3"), N("Mul", ["g3", "k"], "gk"), N("Add", ["g", "gk"], "gi"),
                  N("Mul", ["gi", "c"], "gc"), N("Tanh", ["gc"], "gt"), N("Add", ["one", "gt"], "g1"),
                  N("Mul", ["half", "g"], "gh"), N("Mul", ["gh", "g1"], "a")],
    "onnx_gelu": [N("Gelu", ["g"], "a")],
    "onnx_gelu_tanh": [N("Gelu", ["g"], "a", approximate="tanh")],
}
PROJ = {  # x -> "g", "u"; the down projection "h" -> "y"
    "matmul": [N("MatMul", ["x", "wg"], "g"), N("MatMul", ["x", "wu"], "u")],
    "transposed": [N("Transpose", ["wgT"], "wg1", perm=[1, 0]), N("MatMul", ["x", "wg1"], "g"),
                   N("Transpose", ["wuT"], "wu1", perm=[1, 0]), N("MatMul", ["x", "wu1"], "u")],
    "gemm": [N("Gemm", ["x", "wgT"], "g", transB=1), N("Gemm", ["x", "wuT"], "u", transB=1)],
    "fused_split": [N("MatMul", ["x", "wgu"], "gu"), N("Split", ["gu", "split"], ["g", "u"], axis=-1)],
    "fused_slices": [N("MatMul", ["x", "wgu"], "gu"), N("Slice", ["gu", "i0", "iI", "ax", "s1"], "g"),
                     N("Slice", ["gu", "iI", "i2I", "ax", "s1"], "u")],
}
DOWN = {"matmul": N("MatMul", ["h", "wd"], "y"), "gemm": N("Gemm", ["h", "wdT"], "y", transB=1)}


def mlp(proj="matmul", act="silu", down="matmul", gate_first=True, clamp=()):
    g_out = "a"
    return PROJ[proj] + list(clamp) + ACT[act] + [
        N("Mul", [g_out, "u"] if gate_first else ["u", g_out], "h"), DOWN[down]]


def _graph(build, nodes, x_shape=(1, "seq", H), **inputs):
    return build(nodes, {"x": list(x_shape), **inputs}, ["y"], CONSTS)


def _fused(f, activation="silu", **attrs):
    assert f.counts == {"GatedMLP": 1} and f.ops == {"polyport::GatedMLP": 1}, (f.counts, f.notes)
    node = f.node("GatedMLP")
    assert node.attrs == {"activation": activation, **attrs}
    x, wg, wu, wd = node.inputs
    assert x.name == "x"
    np.testing.assert_array_equal(wg.const, WG)
    np.testing.assert_array_equal(wu.const, WU)
    np.testing.assert_array_equal(wd.const, WD)
    return node


@pytest.mark.parametrize("proj", sorted(PROJ))
@pytest.mark.parametrize("gate_first", [True, False])
def test_projection_spellings(fuse, build, proj, gate_first):
    shape = ("seq", H) if proj == "gemm" else (1, "seq", H)      # Gemm takes 2-D tokens
    _fused(fuse(lambda: _graph(build, mlp(proj, gate_first=gate_first), x_shape=shape), "fuse-gated-mlp"))


def test_gemm_everywhere_on_2d_tokens(fuse, build):
    nodes = mlp("gemm", down="gemm")
    _fused(fuse(lambda: _graph(build, nodes, x_shape=("seq", H)), "fuse-gated-mlp"))


@pytest.mark.parametrize("act", sorted(ACT))
def test_activations(fuse, build, act):
    want = {"silu": "silu", "gelu": "gelu", "onnx_gelu": "gelu"}.get(act, "gelu_tanh")
    _fused(fuse(lambda: _graph(build, mlp(act=act)), "fuse-gated-mlp"), activation=want)


@pytest.mark.parametrize("spelling", ["clip", "min_max"])
def test_swiglu_limit_clamp(fuse, build, spelling):
    """DeepSeek-V4: gate clamped from above, up to [-L, L]: GatedMLP(clamp=L)."""
    nodes = mlp(clamp=[N("Clip", ["g0", "", "L"], "g"), N("Clip", ["u0", "mL", "L"], "u")] if spelling == "clip"
                else [N("Min", ["g0", "L"], "g"), N("Max", ["u0", "mL"], "u1"), N("Min", ["u1", "L"], "u")])
    nodes[0], nodes[1] = N("MatMul", ["x", "wg"], "g0"), N("MatMul", ["x", "wu"], "u0")
    _fused(fuse(lambda: _graph(build, nodes), "fuse-gated-mlp"), clamp=7.0)


# ---- near misses ---------------------------------------------------------------------------------------

def _missed(fuse, build, nodes, **inputs):
    f = fuse(lambda: _graph(build, nodes, **inputs), "fuse-gated-mlp")
    assert not f.counts and "polyport::GatedMLP" not in f.ops
    assert len(f.notes) == 1, f.notes
    return f.notes[0]


def test_gate_and_up_read_different_inputs(fuse, build):
    nodes = mlp()
    nodes[1] = N("MatMul", ["x2", "wu"], "u")
    assert "gate reads %x but up reads %x2" in _missed(fuse, build, nodes, x2=[1, "seq", H])


def test_asymmetric_clamp(fuse, build):
    nodes = mlp(clamp=[N("Clip", ["g0", "", "L"], "g"), N("Clip", ["u0", "mL", "three"], "u")])
    nodes[0], nodes[1] = N("MatMul", ["x", "wg"], "g0"), N("MatMul", ["x", "wu"], "u0")
    assert "not GatedMLP's" in _missed(fuse, build, nodes)


def test_expert_weights_are_not_constants(fuse, build):
    """An MoE expert's weights are gathered per token, not constants: not a dense MLP."""
    nodes = mlp()
    nodes[0] = N("MatMul", ["x", "wg_e"], "g")
    assert "not x @ W with a constant W" in _missed(fuse, build, nodes, wg_e=[H, I])


def test_quick_gelu_is_not_silu(fuse, build):
    """x * sigmoid(1.702 x) has a Sigmoid, but it is not SiLU: the numeric check says no."""
    nodes = mlp()
    nodes[2:4] = [N("Mul", ["g", "q"], "gq"), N("Sigmoid", ["gq"], "sg"), N("Mul", ["g", "sg"], "a")]
    assert "not equivalent to GatedMLP" in _missed(fuse, build, nodes)


def test_in_the_default_pipeline():
    from polyport.passes.pipelines import PIPELINES
    steps = PIPELINES["default"]
    assert steps[0] == steps[-2] == "canonicalize" and steps[-1] == "decode-low-bit"
    assert steps.index("fuse-rmsnorm") < steps.index("fuse-rotary") < steps.index("fuse-gated-mlp")


# ---- the real exports ----------------------------------------------------------------------------------

def expected_mlps(entry) -> int:
    """Dense MLP layers + one shared-expert MLP per MoE layer, from the HF config."""
    cfg, family = entry["hf_config"], entry["family"]
    layers = cfg["num_hidden_layers"]
    if family == "deepseek_v3":
        dense = cfg["first_k_dense_replace"]
    elif family == "deepseek_v4":
        dense = sum(t not in ("moe", "hash_moe") for t in cfg["mlp_layer_types"])
    elif family == "qwen3_moe":
        step, experts = cfg["decoder_sparse_step"], cfg.get("num_experts", cfg.get("num_local_experts", 0))
        dense = sum(i in cfg["mlp_only_layers"] or not (experts > 0 and (i + 1) % step == 0) for i in range(layers))
    elif family == "mixtral":
        dense = 0
    else:
        dense = layers
    assert dense == entry["num_dense_layers"]          # the corpus generator agrees
    shared = (layers - dense) if cfg.get("n_shared_experts") else 0
    return dense + shared


def test_real_model(real_model, real_name):
    model = real_model(real_name)
    mlps = model.fused("GatedMLP")
    assert len(mlps) == expected_mlps(model.entry), model.notes("fuse-gated-mlp")
    cfg = model.entry["hf_config"]
    limit = cfg.get("swiglu_limit")
    for node in mlps:
        assert node.attrs == {"activation": cfg["hidden_act"], **({"clamp": limit} if limit else {})}
        assert all(w.const is not None for w in node.inputs[1:])
    # the per-token expert computations (over GatherND-gathered weights) are left to fuse-moe
    assert model.ops.get("GatherND", 0) == model.ops_canonical.get("GatherND", 0)
    assert not model.notes("fuse-gated-mlp")
    assert all(err <= 1e-4 for err in model.rel_err.values()), model.rel_err

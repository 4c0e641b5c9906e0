"""fuse-rotary: half-split, interleaved, rotated-halves and partial RoPE become polyport::Rotary."""
import numpy as np
import pytest
from onnx import helper

D = 8            # rotated features
BIG = 2 ** 63 - 1


def N(op, ins, outs, **attrs):
    return helper.make_node(op, ins, [outs] if isinstance(outs, str) else outs, **attrs)


def i64(*v):
    return np.array(v, np.int64)


def consts(d=D):
    h = d // 2
    return {"c0": i64(0), "c1": i64(1), "ch": i64(h), "cd": i64(d), "big": i64(BIG), "ax": i64(-1),
            "s1": i64(1), "s2": i64(2), "m1": np.float32(-1.0), "shape": i64(1, 2, -1, d)}


def rope(x="x", out="y", split="slice", neg="neg", cos_first=False):
    """y = x*cos + rotate_half(x)*sin, Llama's chain (x: [1, 2, seq, D], cos/sin: [1, 1, seq, D])."""
    halves = ([N("Slice", [x, "c0", "ch", "ax", "s1"], x + "1"), N("Slice", [x, "ch", "big", "ax", "s1"], x + "2")]
              if split == "slice" else [N("Split", [x], [x + "1", x + "2"], axis=-1, num_outputs=2)])
    negate = N("Neg", [x + "2"], x + "n") if neg == "neg" else N("Mul", [x + "2", "m1"], x + "n")
    return halves + [negate, N("Concat", [x + "n", x + "1"], x + "r", axis=-1),
                     N("Mul", ["cos", x] if cos_first else [x, "cos"], x + "c"),
                     N("Mul", [x + "r", "sin"], x + "s"), N("Add", [x + "c", x + "s"], out)]


def _graph(build, nodes, d=D, x_dim=None, cos_dim=None):
    return build(nodes, {"x": [1, 2, "seq", x_dim or d], "cos": [1, 1, "seq", cos_dim or d],
                         "sin": [1, 1, "seq", cos_dim or d]}, ["y"], consts(d))


@pytest.mark.parametrize("split", ["slice", "split"])
@pytest.mark.parametrize("neg", ["neg", "mul"])
@pytest.mark.parametrize("cos_first", [False, True])
def test_half_split(fuse, build, split, neg, cos_first):
    f = fuse(lambda: _graph(build, rope(split=split, neg=neg, cos_first=cos_first)), "fuse-rotary")
    assert f.counts == {"Rotary": 1} and f.ops == {"polyport::Rotary": 1}
    node = f.node("Rotary")
    assert node.attrs == {"interleaved": 0}
    assert [v.name for v in node.inputs] == ["x", "cos", "sin"]


def test_interleaved_rotate_every_two(fuse, build):
    """DeepSeek-V4: stack(-x[1::2], x[0::2], -1).flatten(-2), cos/sin repeated in place."""
    nodes = [N("Slice", ["x", "c0", "big", "ax", "s2"], "xe"), N("Slice", ["x", "c1", "big", "ax", "s2"], "xo"),
             N("Neg", ["xo"], "xn"), N("Unsqueeze", ["xn", "ax"], "un"), N("Unsqueeze", ["xe", "ax"], "ue"),
             N("Concat", ["un", "ue"], "st", axis=-1), N("Reshape", ["st", "shape"], "xr"),
             N("Mul", ["x", "cos"], "xc"), N("Mul", ["xr", "sin"], "xs"), N("Add", ["xc", "xs"], "y")]
    f = fuse(lambda: _graph(build, nodes), "fuse-rotary")
    assert f.node("Rotary").attrs == {"interleaved": 1} and f.ops == {"polyport::Rotary": 1}


def test_partial_rotary_prefix(fuse, build):
    """Only the first rotary_dim features rotate: Slice, RoPE, Concat back -> one Rotary(rotary_dim)."""
    nodes = ([N("Slice", ["x", "c0", "cd", "ax", "s1"], "xr"), N("Slice", ["x", "cd", "big", "ax", "s1"], "xp")]
             + rope("xr", "yr") + [N("Concat", ["yr", "xp"], "y", axis=-1)])
    f = fuse(lambda: _graph(build, nodes, x_dim=12), "fuse-rotary")
    node = f.node("Rotary")
    assert node.attrs == {"interleaved": 0, "rotary_dim": D} and node.inputs[0].name == "x"
    assert f.ops == {"polyport::Rotary": 1}


def test_rotated_suffix_stays_sliced(fuse, build):
    """DeepSeek's nope-then-rope layout: Rotary on the slice, the Concat stays (Rotary rotates a prefix)."""
    nodes = ([N("Slice", ["x", "c0", "i4", "ax", "s1"], "xp"), N("Slice", ["x", "i4", "big", "ax", "s1"], "xr")]
             + rope("xr", "yr") + [N("Concat", ["xp", "yr"], "y", axis=-1)])
    f = fuse(lambda: build(nodes, {"x": [1, 2, "seq", 12], "cos": [1, 1, "seq", D], "sin": [1, 1, "seq", D]},
                           ["y"], {**consts(), "i4": i64(4)}), "fuse-rotary")
    assert f.node("Rotary").attrs == {"interleaved": 0} and f.node("Rotary").inputs[0].name == "xr"


@pytest.mark.parametrize("strided", [True, False])
def test_rotated_halves(fuse, build, strided):
    """HF DeepSeek-V3 (rope_interleave): Concat(x1*c - x2*s, x2*c + x1*s), c/s the D/2 frequencies.
    Strided halves (x[0::2], x[1::2]) are a de-interleave: Rotary reads Concat(x[0::2], x[1::2])."""
    halves = ([N("Slice", ["x", "c0", "big", "ax", "s2"], "x1"), N("Slice", ["x", "c1", "big", "ax", "s2"], "x2")]
              if strided else [N("Split", ["x"], ["x1", "x2"], axis=-1, num_outputs=2)])
    nodes = halves + [N("Mul", ["x1", "cos"], "a"), N("Mul", ["x2", "sin"], "b"), N("Sub", ["a", "b"], "lo"),
                      N("Mul", ["x2", "cos"], "c"), N("Mul", ["x1", "sin"], "d"), N("Add", ["c", "d"], "hi"),
                      N("Concat", ["lo", "hi"], "y", axis=-1)]
    f = fuse(lambda: _graph(build, nodes, cos_dim=D // 2), "fuse-rotary")
    node = f.node("Rotary")
    assert node.attrs == {"interleaved": 0}
    x_in, cos, sin = (v.producer for v in node.inputs)
    assert cos.op_type == sin.op_type == "Concat" and [v.name for v in cos.inputs] == ["cos", "cos"]
    if strided:
        assert x_in.op_type == "Concat" and [part.producer.op_type for part in x_in.inputs] == ["Slice", "Slice"]
    else:
        assert node.inputs[0].name == "x"


# ---- near misses ---------------------------------------------------------------------------------------

def _missed(fuse, build, nodes, **kw):
    f = fuse(lambda: _graph(build, nodes, **kw), "fuse-rotary")
    assert not f.counts and "polyport::Rotary" not in f.ops
    assert len(f.notes) == 1, f.notes
    return f.notes[0]


def test_halves_swapped(fuse, build):
    """Concat(-x1, x2) rotates the wrong way: not rotate_half."""
    nodes = rope()
    nodes[2] = N("Neg", ["x1"], "xn")
    nodes[3] = N("Concat", ["xn", "x2"], "xr", axis=-1)
    assert "swapped" in _missed(fuse, build, nodes)


def test_halves_of_another_tensor(fuse, build):
    nodes = rope()
    nodes[0] = N("Slice", ["cos", "c0", "ch", "ax", "s1"], "x1")      # one half read from cos
    f = fuse(lambda: build(nodes, {"x": [1, 1, "seq", D], "cos": [1, 1, "seq", D], "sin": [1, 1, "seq", D]},
                           ["y"], consts()), "fuse-rotary")
    assert not f.counts and len(f.notes) == 1 and "not two halves" in f.notes[0]


def test_halves_on_another_axis(fuse, build):
    """Rotating the halves of the heads axis is not RoPE (the pattern wants last-axis halves)."""
    nodes = [N("Slice", ["x", "c0", "c1", "c1", "s1"], "x1"), N("Slice", ["x", "c1", "big", "c1", "s1"], "x2"),
             N("Neg", ["x2"], "xn"), N("Concat", ["xn", "x1"], "xr", axis=1),
             N("Mul", ["x", "cos"], "xc"), N("Mul", ["xr", "sin"], "xs"), N("Add", ["xc", "xs"], "y")]
    note = _missed(fuse, build, nodes)
    assert "looks like RoPE, but" in note and "condition" in note


# ---- the real exports ----------------------------------------------------------------------------------

def expected_rotary(entry) -> tuple[int, int, int]:
    """(Rotary count, interleaved flag, rotated features) from the HF config."""
    cfg, family = entry["hf_config"], entry["family"]
    layers = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if family == "deepseek_v3":        # q_pe, k_pe; rope_interleave: de-interleaved, then half-split
        return 2 * layers, 0, cfg["qk_rope_head_dim"]
    if family == "deepseek_v4":        # q, k and the inverse rotation of the attention output; interleaved
        compressed = sum({"heavily_compressed_attention": 1,       # the compressed KV
                          "compressed_sparse_attention": 3}.get(t, 0)  # + the indexer's keys and queries
                         for t in cfg.get("layer_types", ()))
        return 3 * layers + compressed, 1, cfg["qk_rope_head_dim"]
    return 2 * layers, 0, int(head_dim * cfg.get("partial_rotary_factor", 1.0))


def test_real_model(real_model, real_name):
    model = real_model(real_name)
    count, interleaved, dim = expected_rotary(model.entry)
    ropes = model.fused("Rotary")
    assert len(ropes) == count, model.notes("fuse-rotary")
    for node in ropes:
        assert node.attrs.get("interleaved") == interleaved and not node.attrs.get("rotary_dim")
        assert node.inputs[0].shape[-1] == node.inputs[1].shape[-1] == dim
    assert "Neg" not in model.ops or model.entry["family"] == "deepseek_v4"   # V4 keeps Neg(sin) upstream
    assert all(err <= 1e-4 for err in model.rel_err.values()), model.rel_err

"""fuse-attention: hand-built variants, near misses that must stay, and every real export.

(a) each variant is a small ONNX graph over a symbolic `seq`; after the pass it
    holds one polyport::Attention with the expected attributes and operands, and
    the reference executor gives the same output before and after;
(b) near misses keep the graph unchanged and leave a reason in PassResult.notes;
(c) real exports (examples/models or $POLYPORT_MODELS, and every variant folder
    in it that has its own corpus.json, e.g. sdpa/ and opset23/): one Attention
    per decoder layer, attributes as in the Hugging Face config, logits unchanged.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from polyport.frontend import import_onnx
from polyport.ir.printer import format_graph
from polyport.passes.manager import get_pass
from polyport.passes.pipelines import PIPELINES, run_pipeline
from polyport.runtime.reference import ReferenceSession

from .. import families

MODELS = pathlib.Path(os.environ.get("POLYPORT_MODELS") or
                      pathlib.Path(__file__).resolve().parents[2] / "examples" / "models")

H, D = 4, 8
NEG = np.float32(-np.inf)


# ---- a tiny ONNX builder over a symbolic seq ------------------------------------------------------

class Builder:
    def __init__(self):
        self.nodes, self.inits, self.inputs, self.n = [], [], [], 0

    def input(self, name, shape, dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, value, dtype=np.float32):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type, *inputs, **attrs):
        self.n += 1
        out = f"{op_type.lower()}{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def graph(self, *outputs, opset=20):
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        model = helper.make_model(helper.make_graph(self.nodes, "g", self.inputs, outs, self.inits),
                                  opset_imports=[helper.make_opsetid("", opset)])
        return import_onnx(model)

    # ---- the pieces attention is made of ----
    def qkv(self, heads=H, kv_heads=H, dqk=D, dv=D, same_kv=False):
        q = self.input("q", [1, heads, "seq", dqk])
        k = self.input("k", [1, kv_heads, "seq", dqk])
        v = k if same_kv else self.input("v", [1, kv_heads, "seq", dv])
        return q, k, v

    def positions(self, like):
        """(i [seq, 1], j [1, seq]) int64 positions of queries and keys, computed from `like`'s shape."""
        n = self.op("Gather", self.op("Shape", like), self.const(2, np.int64), axis=0)
        r = self.op("Range", self.const(0, np.int64), n, self.const(1, np.int64))
        return self.op("Unsqueeze", r, self.const([1], np.int64)), self.op("Unsqueeze", r, self.const([0], np.int64))

    def causal_keep(self, like, window=0):
        i, j = self.positions(like)
        keep = self.op("LessOrEqual", j, i)
        if window:
            keep = self.op("And", keep, self.op("Greater", j, self.op("Sub", i, self.const(window, np.int64))))
        return keep

    def additive(self, keep):
        return self.op("Where", keep, self.const(0.0), self.const(np.finfo(np.float32).min))

    def repeat_kv(self, x, kv_heads, heads, d=D):
        x = self.op("Unsqueeze", x, self.const([2], np.int64))
        shape = self.op("Concat", self.const([1, kv_heads, heads // kv_heads], np.int64),
                        self.op("Shape", x, start=3), axis=0)
        x = self.op("Expand", x, shape)
        return self.op("Reshape", x, self.const([1, heads, -1, d], np.int64))

    def scores(self, q, k):
        return self.op("MatMul", q, self.op("Transpose", k, perm=[0, 1, 3, 2]))


def attention(b, q, k, v, *, scale=1 / math.sqrt(D), mask="add", window=0, scale_by="Mul"):
    s = b.scores(q, k)
    s = b.op("Mul", s, b.const(scale)) if scale_by == "Mul" else b.op("Div", s, b.const(1 / scale))
    if mask == "add":
        s = b.op("Add", s, b.additive(b.causal_keep(q, window)))
    elif mask == "where":
        s = b.op("Where", b.causal_keep(q, window), s, b.const(NEG))
    elif mask == "where-block":
        s = b.op("Where", b.op("Not", b.causal_keep(q, window)), b.const(NEG), s)
    return b.op("MatMul", b.op("Softmax", s, axis=-1), v)


def run(graph, seqs=(5, 21), seed=0):
    rng = np.random.default_rng(seed)
    sess, outs = ReferenceSession(graph, check_types=True), []
    for n in seqs:
        feeds = {}
        for v in graph.inputs:
            shape = [d if isinstance(d, int) else n for d in v.shape]
            feeds[v.name] = rng.standard_normal(shape).astype(np.float32) if v.dtype.is_float \
                else rng.integers(0, 2, shape).astype(v.dtype.numpy)
        outs.append(sess.run(feeds)[graph.outputs[0].name])
    return outs


def fuse(graph):
    before = run(graph)
    result = get_pass("fuse-attention").run(graph)
    after = run(graph)
    for want, got in zip(before, after):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    return result


def the_attention(graph):
    (node,) = [n for n in graph.nodes if n.op_type == "Attention"]
    assert node.domain == "polyport"
    assert not any(n.op_type == "Softmax" for n in graph.nodes)
    return node


def attrs_of(node):
    return {k: node.attrs.get(k, 0) for k in ("num_heads", "kv_heads", "causal", "window")}


def shape_of(v):
    return tuple(d if isinstance(d, int) else str(d) for d in v.shape)


# ---- (a) variants that fuse -----------------------------------------------------------------------

def test_mha_additive_causal():
    b = Builder()
    out = attention(b, *b.qkv())
    g = b.graph(out)
    assert fuse(g).counts == {"Attention": 1}
    node = the_attention(g)
    assert attrs_of(node) == {"num_heads": H, "kv_heads": H, "causal": 1, "window": 0}
    assert node.attrs["scale"] == pytest.approx(1 / math.sqrt(D), rel=1e-6)
    assert [v.name for v in node.inputs[:3]] == ["q", "k", "v"] and len(node.inputs) == 3


def test_gqa_takes_kv_before_repeat_kv():
    b = Builder()
    q, k, v = b.qkv(kv_heads=2)
    out = attention(b, q, b.repeat_kv(k, 2, H), b.repeat_kv(v, 2, H))
    g = b.graph(out)
    assert fuse(g).counts == {"Attention": 1}
    node = the_attention(g)
    assert attrs_of(node) == {"num_heads": H, "kv_heads": 2, "causal": 1, "window": 0}
    assert [v.name for v in node.inputs[:3]] == ["q", "k", "v"]


def test_mqa_shared_kv_broadcast_by_matmul():
    b = Builder()
    q, k, v = b.qkv(kv_heads=1, same_kv=True)
    g = b.graph(attention(b, q, k, v))
    fuse(g)
    node = the_attention(g)
    assert attrs_of(node)["kv_heads"] == 1 and node.inputs[1] is node.inputs[2]


def test_gqa_repeated_by_tile_falls_back_to_repeated_kv():
    """Concat([k, k]) repeats heads in the other order (head h reads kv h % 2), which is not
    Attention's GQA grouping: equivalence refuses kv_heads=2, the repeated K/V fuse as MHA."""
    b = Builder()
    q, k, v = b.qkv(kv_heads=2)
    g = b.graph(attention(b, q, b.op("Concat", k, k, axis=1), b.op("Concat", v, v, axis=1)))
    fuse(g)
    assert attrs_of(the_attention(g))["kv_heads"] == H


@pytest.mark.parametrize("how", ["Div", "q", "sqrt-both"])
def test_scale_spellings(how):
    b = Builder()
    q, k, v = b.qkv()
    scale = 1 / math.sqrt(D)
    if how == "Div":
        out = attention(b, q, k, v, scale_by="Div")
    else:
        if how == "q":
            q = b.op("Mul", q, b.const(scale))
        else:
            q = b.op("Mul", q, b.const(math.sqrt(scale)))
            k = b.op("Mul", b.const(math.sqrt(scale)), k)
        out = attention(b, q, k, v, scale=1.0)
    g = b.graph(out)
    fuse(g)
    node = the_attention(g)
    assert node.attrs["scale"] == pytest.approx(scale, rel=1e-6)
    assert [v.name for v in node.inputs[:2]] == ["q", "k"]


def test_k_transposed_before_the_head_reshape():
    """k^T straight from [1, seq, H*D] (Reshape, then one Transpose to [1, H, D, seq]): K is put into
    BHSD by an inserted Transpose."""
    b = Builder()
    q = b.input("q", [1, H, "seq", D])
    k = b.op("Reshape", b.input("k_flat", [1, "seq", H * D]), b.const([1, -1, H, D], np.int64))
    v = b.input("v", [1, H, "seq", D])
    s = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 2, 3, 1])), b.const(0.3))
    g = b.graph(b.op("MatMul", b.op("Softmax", b.op("Add", s, b.additive(b.causal_keep(q))), axis=-1), v))
    fuse(g)
    node = the_attention(g)
    kin = node.inputs[1]
    assert shape_of(kin) == (1, H, "seq", D) and kin.producer.op_type == "Transpose"
    assert node.attrs["scale"] == pytest.approx(0.3)


@pytest.mark.parametrize("mask", ["where", "where-block"])
def test_where_masks(mask):
    b = Builder()
    g = b.graph(attention(b, *b.qkv(), mask=mask))
    fuse(g)
    assert attrs_of(the_attention(g)) == {"num_heads": H, "kv_heads": H, "causal": 1, "window": 0}


@pytest.mark.parametrize("mask", ["add", "where"])
def test_sliding_window(mask):
    b = Builder()
    g = b.graph(attention(b, *b.qkv(), mask=mask, window=4))
    fuse(g)   # compares numerics at seq 21 > window
    assert attrs_of(the_attention(g)) == {"num_heads": H, "kv_heads": H, "causal": 1, "window": 4}


def test_window_beyond_the_fixed_probes():
    """A window longer than every fixed probe length is found through the mask's own constants."""
    b = Builder()
    g = b.graph(attention(b, *b.qkv(), window=100))
    get_pass("fuse-attention").run(g)
    assert attrs_of(the_attention(g))["window"] == 100


def test_no_mask_is_not_causal():
    b = Builder()
    g = b.graph(attention(b, *b.qkv(), mask=None))
    fuse(g)
    assert attrs_of(the_attention(g))["causal"] == 0


def test_data_mask_stays_an_operand():
    b = Builder()
    q, k, v = b.qkv()
    pad = b.input("pad", [1, 1, 1, "seq"])
    s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(b.causal_keep(q)))
    s = b.op("Add", s, pad)
    g = b.graph(b.op("MatMul", b.op("Softmax", s, axis=-1), v))
    fuse(g)
    node = the_attention(g)
    assert attrs_of(node)["causal"] == 1 and node.inputs[3].name == "pad"


def test_sinks_concatenated_and_sliced_off():
    """DeepSeek-V4 / gpt-oss: a per-head sink logit joins the softmax and is dropped after it."""
    b = Builder()
    q, k, v = b.qkv(kv_heads=1, same_kv=True)
    sink = np.linspace(-0.5, 0.5, H).astype(np.float32).reshape(1, H, 1, 1)
    s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.3)), b.additive(b.causal_keep(q, window=4)))
    col_shape = b.op("Concat", b.const([1, H], np.int64), b.op("Shape", s, start=2, end=3),
                     b.const([1], np.int64), axis=0)
    s = b.op("Concat", s, b.op("Expand", b.const(sink), col_shape), axis=-1)
    s = b.op("Sub", s, b.op("ReduceMax", s, b.const([-1], np.int64), keepdims=1))
    p = b.op("Slice", b.op("Softmax", s, axis=-1), b.const([0], np.int64), b.const([-1], np.int64),
             b.const([-1], np.int64))
    g = b.graph(b.op("MatMul", p, v))
    fuse(g)
    node = the_attention(g)
    assert attrs_of(node) == {"num_heads": H, "kv_heads": 1, "causal": 1, "window": 4}
    np.testing.assert_array_equal(node.inputs[4].const, sink.reshape(H))


@pytest.mark.parametrize("cap,post", [(50.0, 50.0), (2.0, 1.0)])
def test_soft_capped_scores(cap, post):
    """Gemma 2: (tanh(q k^T * scale / c) * c) + mask; the factor after the tanh is the cap (c = 1 when it is
    absent), the factors before it the scale times c."""
    b = Builder()
    q, k, v = b.qkv(kv_heads=2)
    s = b.op("Div", b.op("Mul", b.scores(q, b.repeat_kv(k, 2, H)), b.const(0.35)), b.const(cap))
    s = b.op("Tanh", s)
    s = b.op("Mul", s, b.const(post)) if post != 1.0 else s
    s = b.op("Add", s, b.additive(b.causal_keep(q, window=3)))
    g = b.graph(b.op("MatMul", b.op("Softmax", s, axis=-1), b.repeat_kv(v, 2, H)))
    assert fuse(g).counts == {"Attention": 1}
    node = the_attention(g)
    assert attrs_of(node) == {"num_heads": H, "kv_heads": 2, "causal": 1, "window": 3}
    assert node.attrs["softcap"] == pytest.approx(post)
    assert node.attrs["scale"] == pytest.approx(0.35 / cap * post, rel=1e-6)


def test_mla_dqk_differs_from_dv():
    """DeepSeek-V3 MLA: q/k head dim 24 (nope 16 + rope 8 by Concat), v head dim 16."""
    b = Builder()
    q = b.op("Concat", b.input("q_nope", [1, H, "seq", 16]), b.input("q_rope", [1, H, "seq", 8]), axis=-1)
    k_rope = b.op("Expand", b.input("k_rope", [1, 1, "seq", 8]),
                  b.op("Concat", b.const([1, H], np.int64), b.op("Shape", q, start=2, end=3),
                       b.const([8], np.int64), axis=0))
    k = b.op("Concat", b.input("k_nope", [1, H, "seq", 16]), k_rope, axis=-1)
    v = b.input("v", [1, H, "seq", 16])
    g = b.graph(attention(b, q, k, v, scale=24 ** -0.5))
    fuse(g)
    node = the_attention(g)
    assert shape_of(node.inputs[0])[-1] == 24 and shape_of(node.inputs[1])[-1] == 24
    assert shape_of(node.inputs[2])[-1] == 16 and shape_of(node.outputs[0]) == (1, H, "seq", 16)
    assert node.attrs["scale"] == pytest.approx(24 ** -0.5, rel=1e-6)


def test_sdpa_nan_guard_after_softmax():
    b = Builder()
    q, k, v = b.qkv()
    s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(b.causal_keep(q)))
    p = b.op("Softmax", s, axis=-1)
    p = b.op("Where", b.op("IsNaN", p), b.const(0.0), p)
    g = b.graph(b.op("MatMul", p, v))
    fuse(g)
    the_attention(g)


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_imported_onnx_attention_mask_proved_causal(mask):
    """sdpa at opset 23 exports ONNX Attention after HF's repeat_kv, with an explicit position mask; the
    importer makes it polyport::Attention as is, the pass takes K/V before the repeat and proves the
    mask a sliding window."""
    b = Builder()
    q, k, v = b.qkv(kv_heads=2)
    keep = b.causal_keep(q, window=4)
    out = b.op("Attention", q, b.repeat_kv(k, 2, H), b.repeat_kv(v, 2, H),
               keep if mask == "bool" else b.additive(keep))
    g = b.graph(out, opset=23)
    assert attrs_of(the_attention(g)) == {"num_heads": H, "kv_heads": H, "causal": 0, "window": 0}
    assert fuse(g).counts == {"Attention refined": 1}
    node = the_attention(g)
    assert attrs_of(node) == {"num_heads": H, "kv_heads": 2, "causal": 1, "window": 4}
    assert [v.name for v in node.inputs] == ["q", "k", "v"]


def test_default_pipeline_order():
    assert PIPELINES["default"].index("fuse-attention") == PIPELINES["default"].index("fuse-rotary") + 1
    assert PIPELINES["default"].index("fuse-attention") < PIPELINES["default"].index("fuse-moe")


# ---- (b) near misses: the graph stays as it was, with a reason ----------------------------------

def near_miss(build, reason):
    b = Builder()
    g = b.graph(build(b))
    text = format_graph(g)
    result = get_pass("fuse-attention").run(g)
    assert not result.counts and format_graph(g) == text
    assert any(reason in note for note in result.notes), result.notes


def test_softmax_on_the_wrong_axis():
    def build(b):
        q, k, v = b.qkv()
        s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(b.causal_keep(q)))
        return b.op("MatMul", b.op("Softmax", s, axis=2), v)
    near_miss(build, "not the last axis")


def test_anti_causal_mask():
    def build(b):
        q, k, v = b.qkv()
        i, j = b.positions(q)
        s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(b.op("GreaterOrEqual", j, i)))
        return b.op("MatMul", b.op("Softmax", s, axis=-1), v)
    near_miss(build, "not causal / sliding-window")


def test_scattered_position_mask():
    def build(b):
        q, k, v = b.qkv()
        i, j = b.positions(q)
        mixed = b.op("Mod", b.op("Add", b.op("Mul", i, b.const(7, np.int64)), j), b.const(3, np.int64))
        keep = b.op("Or", b.op("Equal", i, j), b.op("Equal", mixed, b.const(0, np.int64)))
        s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(keep))
        return b.op("MatMul", b.op("Softmax", s, axis=-1), v)
    near_miss(build, "not causal / sliding-window")


def test_position_bias_is_not_a_mask():
    def build(b):
        q, k, v = b.qkv()
        i, j = b.positions(q)
        bias = b.op("Cast", b.op("Sub", j, i), to=TensorProto.FLOAT)
        s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), bias)
        return b.op("MatMul", b.op("Softmax", s, axis=-1), v)
    near_miss(build, "a bias, not a mask")


def test_imported_onnx_attention_keeps_a_mask_it_cannot_prove():
    def build(b):
        q, k, v = b.qkv()
        i, j = b.positions(q)
        return b.op("Attention", q, k, v, b.op("GreaterOrEqual", j, i))
    b = Builder()
    g = b.graph(build(b), opset=23)
    text = format_graph(g)
    result = get_pass("fuse-attention").run(g)
    assert not result.counts and format_graph(g) == text
    assert any("not causal / sliding-window" in n for n in result.notes), result.notes


def test_softmax_output_used_elsewhere_too():
    def build(b):
        q, k, v = b.qkv()
        s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(b.causal_keep(q)))
        p = b.op("Softmax", s, axis=-1)
        return b.op("Add", b.op("MatMul", p, v), b.op("ReduceSum", p, b.const([-1], np.int64), keepdims=1))
    near_miss(build, "not only multiplied by v")


def test_scores_not_multiplied_by_v():
    def build(b):
        q, k, _ = b.qkv()
        s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(b.causal_keep(q)))
        return b.op("ReduceSum", b.op("Softmax", s, axis=-1), b.const([-1], np.int64), keepdims=1)
    near_miss(build, "not only multiplied by v")


def test_mismatched_heads():
    """q has one head and K four: the scores' heads come from K, which Attention cannot express."""
    def build(b):
        q = b.input("q", [1, 1, "seq", D])
        k = b.input("k", [1, H, "seq", D])
        v = b.input("v", [1, H, "seq", D])
        return attention(b, q, k, v)
    near_miss(build, f"no [batch, {H}, seq, dim] q")


def test_scores_through_a_nonlinearity():
    def build(b):
        q, k, v = b.qkv()
        s = b.op("Sigmoid", b.op("Mul", b.scores(q, k), b.const(0.35)))
        return b.op("MatMul", b.op("Softmax", b.op("Add", s, b.additive(b.causal_keep(q))), axis=-1), v)
    near_miss(build, "scores pass through Sigmoid")


def test_mask_inside_the_soft_cap():
    """tanh(s + mask) is no soft-cap of the scores: a -inf mask would become -c, a visible logit."""
    def build(b):
        q, k, v = b.qkv()
        s = b.op("Add", b.op("Mul", b.scores(q, k), b.const(0.35)), b.additive(b.causal_keep(q)))
        s = b.op("Mul", b.op("Tanh", b.op("Div", s, b.const(5.0))), b.const(5.0))
        return b.op("MatMul", b.op("Softmax", s, axis=-1), v)
    near_miss(build, "inside the soft-cap's tanh")


# ---- (c) real exports -----------------------------------------------------------------------------

def _corpora() -> list[pathlib.Path]:
    dirs = [MODELS] + sorted(p.parent for p in MODELS.glob("*/corpus.json"))
    return [d for d in dirs if (d / "corpus.json").exists()]


def _real_models():
    out = []
    for d in _corpora():
        corpus = json.loads((d / "corpus.json").read_text())
        entries = sorted(corpus["models"].items()) + ([("bundled", corpus["bundled"])] if "bundled" in corpus else [])
        for name, entry in entries:
            if (d / entry["file"]).exists():
                tag = name if d == MODELS else f"{d.name}/{name}"
                out.append(pytest.param((d / entry["file"], entry), id=tag, marks=families.marks(name, "attention", skip_gap=True)))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason=f"no corpus.json in {MODELS}"))]


# DeepSeek-V4 compressed attention (HCA / CSA) appends seq // rate compressed KV entries after the window's
# keys: one Attention over both, its window / causal pattern and the compressed entries' visibility (by
# position for HCA, the indexer's top-k for CSA) in the mask operand.
COMPRESSED = ("heavily_compressed_attention", "compressed_sparse_attention")


def expected_layers(entry: dict) -> list[dict]:
    """Attention attributes per decoder layer, from the Hugging Face config ("mask": a mask operand)."""
    cfg = entry["hf_config"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("qk_head_dim") or cfg.get("head_dim") or cfg["hidden_size"] // heads
    # DeepSeek-V4: softmax_scale; Granite: attention_multiplier; Gemma: query_pre_attn_scalar ** -0.5
    scale = cfg.get("softmax_scale") or cfg.get("attention_multiplier") or \
        (cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5
    types = cfg.get("layer_types")
    out = []
    for i in range(cfg["num_hidden_layers"]):
        compressed = bool(types) and types[i] in COMPRESSED
        sliding = types[i] == "sliding_attention" if types else \
            bool(cfg.get("sliding_window")) and cfg.get("use_sliding_window", True)
        out.append({"num_heads": heads, "kv_heads": cfg.get("num_key_value_heads") or heads,
                    "causal": int(not compressed), "window": cfg["sliding_window"] if sliding else 0,
                    "scale": scale, "mask": compressed, "softcap": cfg.get("attn_logit_softcapping") or 0.0})
    return out


@pytest.fixture(scope="module", params=_real_models())
def fused_model(request):
    path, entry = request.param
    graph = import_onnx(path)
    run_pipeline(graph, "canonicalize")
    vocab = graph.outputs[0].shape[-1]
    feeds = {n: {"input_ids": np.random.default_rng(n).integers(0, vocab, (1, n)).astype(np.int64)}
             for n in (7, 33)}
    before = {n: ReferenceSession(graph).run(f)["logits"] for n, f in feeds.items()}
    softmax_before = sum(n.op_type == "Softmax" for n in graph.nodes)
    result = get_pass("fuse-attention").run(graph)
    after = {n: ReferenceSession(graph, check_types=True).run(f)["logits"] for n, f in feeds.items()}
    return entry, graph, result, before, after, softmax_before


def test_real_export_one_attention_per_layer(fused_model):
    entry, graph, result, _, _, softmax_before = fused_model
    layers = expected_layers(entry)
    nodes = [n for n in graph.nodes if n.op_type == "Attention"]
    # fused from Softmax here, or imported fused (ONNX Attention at opset 23) and refined
    assert len(nodes) == len(layers) and sum(result.counts.values()) == len(layers), result.notes
    for node, w in zip(nodes, layers):
        assert attrs_of(node) == {k: w[k] for k in ("num_heads", "kv_heads", "causal", "window")}
        assert node.attrs["scale"] == pytest.approx(w["scale"], rel=1e-5)
        assert node.attrs.get("softcap", 0.0) == pytest.approx(w["softcap"])      # Gemma 2's tanh soft-cap
        has_mask = len(node.inputs) > 3 and node.inputs[3] is not None
        assert has_mask == w["mask"], node                          # only compressed layers keep one
    # no other attention softmax left: what remains (routers, mHC mixing, compressor pooling) feeds no MatMul
    left = [n for n in graph.nodes if n.op_type == "Softmax"]
    assert len(left) == softmax_before - result.counts["Attention"]
    feeds_matmul = [n for n in left for u in n.outputs[0].users
                    if u.op_type == "MatMul" or u.op_type == "Slice" and "MatMul" in
                    [w.op_type for w in u.outputs[0].users]]
    assert not feeds_matmul


def test_real_export_operands(fused_model):
    entry, graph, *_ = fused_model
    cfg = entry["hf_config"]
    for node in (n for n in graph.nodes if n.op_type == "Attention"):
        q, k, v = node.inputs[:3]
        assert shape_of(q)[:3] == (1, cfg["num_attention_heads"], "seq")
        assert shape_of(k)[1] == node.attrs["kv_heads"] and shape_of(v)[1] == node.attrs["kv_heads"]
        if entry["family"] == "deepseek_v3":   # MLA: Dqk = nope + rope != Dv
            assert shape_of(q)[-1] == cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
            assert shape_of(v)[-1] == cfg["v_head_dim"]
        if entry["family"] == "deepseek_v4":   # shared-KV MQA with sinks
            assert k is v and len(node.inputs) == 5 and node.inputs[4].shape == (cfg["num_attention_heads"],)


@pytest.mark.parametrize("seq", (7, 33))
def test_real_export_logits_unchanged(fused_model, seq):
    _, _, _, before, after, _ = fused_model
    want, got = before[seq], after[seq]
    assert np.abs(got.astype(np.float64) - want).max() <= 1e-4 * np.abs(want).max()

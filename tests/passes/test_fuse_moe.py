"""fuse-moe: routed MoE blocks -> polyport::MoE.

(a) small MoE blocks built with onnx.helper in the style torch.onnx.export
    (dynamo, batched_mm experts) writes them, one per routing variant: the
    op, its attributes, and reference numerics before == after;
(b) near misses: each leaves the graph unchanged and says why;
(c) every real MoE export: one MoE per MoE layer with the config's attributes,
    nothing of the router or the per-token expert gathers left, logits unchanged.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polyport.frontend import import_onnx
from polyport.ir.printer import format_graph
from polyport.ir.verifier import verify
from polyport.passes.manager import PassManager, get_pass
from polyport.passes.pipelines import PIPELINES
from polyport.runtime.reference import ReferenceSession

from .. import families
from ..fp8_models import block_quantize, dequantize_linear, dequantized

E, H, I = 8, 16, 12          # experts, hidden size, expert width of the hand-built blocks
OPSET = 20


# ---- (a) hand-built blocks -------------------------------------------------------------------

class _Builder:
    """Just enough of a graph builder: `b.op("Add", a, c)` returns the output name."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, *values) -> str:
        return self.const(np.array(values, np.int64))

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


def _filled(b: _Builder, like: str, value: float, dtype=TensorProto.FLOAT) -> str:
    return b.op("ConstantOfShape", b.op("Shape", like), value=helper.make_tensor("v", dtype, [1], [value]))


def moe_model(*, k=2, scoring="softmax", bias=False, groups=None, renormalize=True, scale=1.0, clamp=0.0,
              hash_routing=False, weights_from="gather", experts="split", combine="reducesum",
              x_rank=2, residual=True, near_miss=None, seed=0, biases=False, alpha=1.0, up_offset=0.0,
              coded=(None, None)) -> onnx.ModelProto:
    """One routed MoE block over x [seq, H] (or [1, seq, H]), written the way the exporter writes it.

    out = x + moe(x), or moe(x) itself without `residual`. `biases`: a router (Gemm) bias and per-expert
    biases on every projection (gpt-oss); `alpha`, `up_offset`: up_offset + up times gate * sigmoid(alpha gate).
    `coded`: (format, format) of the gate / up and the down expert weights: computed from fp8 | int8 | int4
    codes with 16x16 block scales (tests/fp8_models.py; "qdq-" + format: by DequantizeLinear, opset 21) or
    (None) stored in f32."""
    rng = np.random.default_rng(seed)
    b = _Builder()
    f32 = np.float32
    router_w = rng.standard_normal((E, H)).astype(f32) * 0.5
    if x_rank == 2:                     # the exporter's flatten, then F.linear as Gemm
        router_b = [b.const((rng.standard_normal(E) * 0.5).astype(f32))] if biases else []
        logits = b.op("Gemm", "x", b.const(router_w), *router_b, transB=1)
    else:                               # a router over [1, seq, H]; the experts flatten x themselves
        logits = b.op("MatMul", "x", b.const(router_w.T.copy()))
    if scoring == "softmax":
        scores = b.op("Softmax", logits, axis=-1)
    elif scoring == "sigmoid":
        scores = b.op("Sigmoid", logits)
    elif scoring == "sqrtsoftplus":     # torch: softplus(x) = x where x > 20
        big = b.op("Greater", logits, b.const(f32(20.0)))
        scores = b.op("Sqrt", b.op("Where", big, logits, b.op("Softplus", logits)))
    else:                               # "topk-softmax": top-k of the raw logits, softmax over the chosen
        scores = logits
    choice = scores
    if bias:
        choice = b.op("Add", scores, b.const((rng.standard_normal(E) * 0.1).astype(f32)))
    if groups:
        n_group, topk_group = groups
        grouped = b.op("Reshape", choice, b.ints(-1, n_group, E // n_group))
        if near_miss == "group_max":
            group_score = b.op("ReduceMax", grouped, b.ints(-1), keepdims=0)
        else:
            best2 = b.op("TopK", grouped, b.ints(2), outputs=2, axis=-1)[0]
            group_score = b.op("ReduceSum", best2, b.ints(-1), keepdims=0)
        group_idx = b.op("TopK", group_score, b.ints(topk_group), outputs=2, axis=-1, sorted=0)[1]
        mask = b.op("ScatterElements", _filled(b, group_score, 0.0), group_idx, _filled(b, group_idx, 1.0), axis=1)
        mask = b.op("Expand", b.op("Unsqueeze", mask, b.ints(-1)), b.op("Shape", grouped))
        keep = b.op("Cast", b.op("Reshape", mask, b.ints(-1, E)), to=TensorProto.BOOL)
        fill = 0.0 if near_miss == "fill_zero" else -np.inf
        choice = b.op("Where", b.op("Not", keep), b.const(f32(fill)), choice)
    values, idx = b.op("TopK", choice, b.ints(k), outputs=2, axis=-1, largest=1, sorted=0)
    x_shape = ["seq", H] if x_rank == 2 else [1, "seq", H]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if hash_routing:
        table = np.stack([rng.permutation(E)[:k] for _ in range(32)]).astype(np.int64)
        idx = b.op("GatherND", b.const(table), b.op("Unsqueeze", "ids", b.ints(-1)))
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["seq"]))
    w = b.op("GatherElements", scores, idx, axis=x_rank - 1) if weights_from == "gather" else values
    if scoring == "topk-softmax":
        w = b.op("Softmax", w, axis=-1)
    if renormalize:
        total = b.op("ReduceSum", w, b.ints(-1), keepdims=1)
        if renormalize == "clamp":          # Ernie 4.5: w / clamp(sum, min=norm_min)
            total = b.op("Clip", total, b.const(f32(1e-12)))
        w = b.op("Div", w, total)
    if scale != 1.0:
        w = b.op("Mul", w, b.const(f32(scale)))

    # batched_mm experts: repeat each token k times, gather each (token, expert)'s weights, batched MatMul
    x2 = "x" if x_rank == 2 else b.op("Reshape", "x", b.ints(-1, H))
    xs = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", x2, b.ints(1)), b.ints(1, k, 1)), b.ints(-1, H))
    flat = b.op("Reshape", idx, b.ints(-1))
    rows = b.op("Unsqueeze", flat, b.ints(-1))

    def stored(weights, fmt):
        if fmt is None:
            return b.const(weights)
        form = dequantize_linear if fmt.startswith("qdq-") else dequantized
        return form(b, *block_quantize(weights, fmt.split("-")[-1], (16, 16)), (16, 16))

    def linear(weights, v, fmt):        # F.linear per (token, expert): W[e] [out, in] @ v
        picked = b.op("GatherND", stored(weights, fmt), rows)
        y = b.op("Squeeze", b.op("MatMul", picked, b.op("Unsqueeze", v, b.ints(-1))), b.ints(-1))
        if biases:                      # gpt-oss: bias[e] gathered by the same rows
            y = b.op("Add", y, b.op("GatherND", b.const((rng.standard_normal(weights.shape[:2]) * 0.3).astype(f32)),
                                    rows))
        return y

    if experts in ("split", "interleaved"):
        h = linear((rng.standard_normal((E, 2 * I, H)) * 0.3).astype(f32), xs, coded[0])
        if experts == "split":
            gate, up = b.op("Split", h, outputs=2, axis=1, num_outputs=2)
        else:                           # gpt-oss style: gate = h[:, ::2], up = h[:, 1::2]
            gate = b.op("Slice", h, b.ints(0), b.ints(2 ** 62), b.ints(1), b.ints(2))
            up = b.op("Slice", h, b.ints(1), b.ints(2 ** 62), b.ints(1), b.ints(2))
    else:                               # separate gate and up, stored [E, H, I]: x @ W[e]
        x3 = b.op("Unsqueeze", xs, b.ints(1))
        gate, up = (b.op("Squeeze", b.op("MatMul", x3, b.op("Gather", stored(
            (rng.standard_normal((E, H, I)) * 0.3).astype(f32), coded[0]), flat, axis=0)), b.ints(1))
            for _ in range(2))
    if clamp:
        gate = b.op("Clip", gate, "", b.const(f32(clamp)))
        up_limit = 3.0 if near_miss == "up_clamp_mismatch" else clamp
        up = b.op("Clip", up, b.const(f32(-up_limit)), b.const(f32(up_limit)))
    slope = gate if alpha == 1.0 else b.op("Mul", gate, b.const(f32(alpha)))
    if up_offset:
        up = b.op("Add", up, b.const(f32(up_offset)))
    act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", slope)), up)
    if near_miss == "expert_switch":    # expert 0 uses another activation
        is0 = b.op("Unsqueeze", b.op("Equal", flat, b.ints(0)), b.ints(-1))
        act = b.op("Where", is0, b.op("Mul", b.op("Tanh", gate), up), act)
    out = linear((rng.standard_normal((E, H, I)) * 0.3).astype(f32), act, coded[1])
    if near_miss == "per_expert_scale":
        out = b.op("Mul", out, b.op("Gather", b.const(rng.standard_normal((E, H)).astype(f32)), flat, axis=0))
    out = b.op("Mul", out, b.op("Unsqueeze", b.op("Reshape", w, b.ints(-1)), b.ints(-1)))
    if combine == "reducesum":
        y = b.op("ReduceSum", b.op("Reshape", out, b.ints(-1, k, H)), b.ints(1), keepdims=0)
    else:                               # index_add: scatter-add each (token, expert) row into its token
        seq = b.op("Squeeze", b.op("Slice", b.op("Shape", x2), b.ints(0), b.ints(1)), b.ints(0))
        tokens = b.op("Range", b.const(np.int64(0)), seq, b.const(np.int64(1)))
        tokens = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", tokens, b.ints(1)), b.ints(1, k)), b.ints(-1))
        y = b.op("ScatterND", _filled(b, x2, 0.0), b.op("Unsqueeze", tokens, b.ints(-1)), out, reduction="add")
    if x_rank == 3:
        y = b.op("Reshape", y, b.ints(1, -1, H))
    if residual:
        b.nodes.append(helper.make_node("Add", ["x", y], ["out"]))
    else:                               # the combine itself is the graph output
        assert b.nodes[-1].output[0] == y
        b.nodes[-1].output[0] = "out"
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, x_shape)]
    if near_miss == "shared_ids":       # another hash layer's lookup shares Unsqueeze(ids) after CSE
        table = rng.integers(0, E, (32, k)).astype(np.int64)
        b.nodes.append(helper.make_node("GatherND", [b.const(table), b.op("Unsqueeze", "ids", b.ints(-1))],
                                        ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.INT64, ["seq", k]))
    if near_miss == "scores_output":    # e.g. the router scores kept for an auxiliary loss
        b.nodes.append(helper.make_node("ReduceMean", [scores, b.ints(0)], ["aux"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, [E]))
    graph = helper.make_graph(b.nodes, "moe_block", inputs, outputs, b.inits)
    qdq = any(f is not None and f.startswith("qdq-") for f in coded)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21 if qdq else OPSET)])


def _fuse(model: onnx.ModelProto):
    graph = import_onnx(model)
    PassManager(["canonicalize"]).run(graph)
    before = format_graph(graph)
    result = get_pass("fuse-moe").run(graph)
    verify(graph)
    return graph, before, result


def _feeds(graph, seq: int, rng) -> dict:
    shape = tuple(d if isinstance(d, int) else seq for d in graph.inputs[0].shape)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    if any(v.name == "ids" for v in graph.inputs):
        feeds["ids"] = rng.integers(0, 32, seq).astype(np.int64)
    return feeds


def _assert_same_numerics(model: onnx.ModelProto, fused) -> None:
    original = import_onnx(model)
    rng = np.random.default_rng(1)
    for seq in (1, 5, 17):
        feeds = _feeds(original, seq, rng)
        want = ReferenceSession(original).run(feeds)["out"]
        got = ReferenceSession(fused, check_types=True).run(feeds)["out"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def _moe_nodes(graph):
    return [n for n in graph.nodes if n.op_type == "MoE" and n.domain == "polyport"]


DEFAULTS = dict(top_k=2, scoring="softmax", n_group=1, topk_group=1, renormalize=0, routed_scaling=1.0,
                activation="silu", clamp=0.0)

VARIANTS = {
    # name: (builder kwargs, attributes expected besides DEFAULTS, e_bias?, hash?)
    "mixtral": (dict(weights_from="topk", renormalize=True), dict(renormalize=1), False, False),
    "qwen3_unnormalised": (dict(k=3, weights_from="topk", renormalize=False), dict(top_k=3), False, False),
    "deepseek_v3_groups": (dict(scoring="sigmoid", bias=True, groups=(4, 2), scale=2.5),
                           dict(scoring="sigmoid", n_group=4, topk_group=2, renormalize=1, routed_scaling=2.5),
                           True, False),
    "v4_topk_clamp": (dict(scoring="sqrtsoftplus", bias=True, scale=1.5, clamp=7.0),
                      dict(scoring="sqrtsoftplus", renormalize=1, routed_scaling=1.5, clamp=7.0), True, False),
    "v4_hash": (dict(scoring="sqrtsoftplus", hash_routing=True, scale=1.5, clamp=7.0),
                dict(scoring="sqrtsoftplus", renormalize=1, routed_scaling=1.5, clamp=7.0), False, True),
    "sigmoid_separate_scatter": (dict(scoring="sigmoid", renormalize=False, experts="separate",
                                      combine="scatter"), dict(scoring="sigmoid"), False, False),
    "interleaved_scaled": (dict(experts="interleaved", renormalize=False, scale=0.5),
                           dict(routed_scaling=0.5), False, False),
    "topk_then_softmax": (dict(scoring="topk-softmax", weights_from="topk", renormalize=False),
                          dict(renormalize=1), False, False),
    "top1": (dict(k=1, renormalize=False), dict(top_k=1), False, False),
    "ernie_clamped_sum_e_bias": (dict(bias=True, renormalize="clamp"), dict(renormalize=1), True, False),
    "x_1_seq_h": (dict(x_rank=3, renormalize=True), dict(renormalize=1), False, False),
    "output_is_graph_output": (dict(residual=False, combine="scatter"), dict(renormalize=1), False, False),
    "gpt_oss": (dict(scoring="topk-softmax", weights_from="topk", renormalize=False, experts="interleaved",
                     biases=True, clamp=7.0, alpha=1.702, up_offset=1.0),
                dict(renormalize=1, clamp=7.0, alpha=pytest.approx(1.702), up_offset=1.0), False, False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fuses_hand_built_block(variant):
    kwargs, attrs, has_bias, has_hash = VARIANTS[variant]
    model = moe_model(**kwargs)
    graph, _, result = _fuse(model)
    (moe,) = _moe_nodes(graph)
    assert result.counts["MoE"] == 1 and not result.notes, result.notes
    assert moe.attrs == {**DEFAULTS, **attrs}
    x = graph.inputs[0]
    assert moe.inputs[0] is x and moe.outputs[0].type == x.type
    assert (moe.inputs[2] is not None) == has_bias
    assert moe.inputs[3].shape == (E, H, I) and moe.inputs[4].shape == (E, H, I) and moe.inputs[5].shape == (E, I, H)
    if has_hash:
        assert moe.inputs[6].shape == (32, 2) and moe.inputs[7] is graph.inputs[1]
    elif kwargs.get("biases"):      # router_b, b_gate, b_up, b_down after absent hash operands and scales
        assert list(moe.inputs[6:11]) == [None] * 5
        assert [v.shape for v in moe.inputs[11:]] == [(E,), (E, I), (E, I), (E, H)]
    else:
        assert len(moe.inputs) == 6
    left = {n.op_type for n in graph.nodes}
    assert not left & {"TopK", "Softmax", "Sigmoid", "Softplus", "GatherND", "Gather", "GatherElements", "MatMul",
                       "ReduceSum", "ScatterND"}, left
    _assert_same_numerics(model, graph)


def _to_half(model: onnx.ModelProto, np_dtype, onnx_dtype) -> onnx.ModelProto:
    """The same block in half precision (weights, activations, filled constants)."""
    g = model.graph
    for i, init in enumerate(list(g.initializer)):
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32:
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr.astype(np_dtype), init.name))
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = onnx_dtype
    for node in g.node:
        for a in node.attribute:
            if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(helper.make_tensor("v", onnx_dtype, [1], [numpy_helper.to_array(a.t).item()]))
    return model


@pytest.mark.parametrize("variant", ["mixtral", "deepseek_v3_groups", "v4_hash"])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_block_fuses(variant, dtype):
    import ml_dtypes
    np_dtype, onnx_dtype = {"f16": (np.float16, TensorProto.FLOAT16),
                            "bf16": (ml_dtypes.bfloat16, TensorProto.BFLOAT16)}[dtype]
    kwargs, attrs, _, _ = VARIANTS[variant]
    for seed in range(3):   # bf16 scores tie often; the check must not depend on a lucky draw
        graph, _, result = _fuse(_to_half(moe_model(seed=seed, **kwargs), np_dtype, onnx_dtype))
        (moe,) = _moe_nodes(graph)
        assert moe.attrs == {**DEFAULTS, **attrs} and not result.notes, result.notes
        assert moe.inputs[3].dtype.name == dtype


@pytest.mark.parametrize("fmt,bits,code_dtype", [("fp8", 8, np.uint8), ("int8", 8, np.int8), ("int4", 4, np.uint8),
                                                  ("qdq-fp8", 8, np.uint8), ("qdq-int4", 4, np.uint8)])
@pytest.mark.parametrize("experts", ["split", "separate"])
def test_experts_computed_from_codes_stay_quantized(fmt, bits, code_dtype, experts):
    """Expert weights an export dequantizes from block codes (DeepSeek's FP8 form, or DequantizeLinear blocked
    along K) become the MoE's quantized experts: codes K first ([E, K, N], int4 two per byte along K), scales
    [E, KB, N], no f32 weights."""
    model = moe_model(scoring="sigmoid", bias=True, groups=(4, 2), scale=2.5, experts=experts, coded=(fmt, fmt))
    graph, _, result = _fuse(model)
    (moe,) = _moe_nodes(graph)
    assert result.counts["MoE"] == 1 and not result.notes, result.notes
    assert moe.attrs["bits"] == bits and moe.attrs["format"] == ("fp8e4m3" if fmt.endswith("fp8") else "int")
    assert moe.attrs["block_size"] == 16                   # one block spans H = 16 and I = 12
    k = 2 if bits == 4 else 1
    assert [v.shape for v in moe.inputs[3:6]] == [(E, H // k, I), (E, H // k, I), (E, I // k, H)]
    assert all(v.const.dtype == code_dtype for v in moe.inputs[3:6])
    assert [v.shape for v in moe.inputs[8:11]] == [(E, 1, I), (E, 1, I), (E, 1, H)]
    graph.remove_unused()
    assert not any(v.const.dtype == np.float32 and v.const.size >= E * H * I for v in graph.constants.values())
    _assert_same_numerics(model, graph)


def test_experts_partly_computed_from_codes_are_left_alone():
    """The MoE holds one format for its three projections: f32 gate_up beside an fp8 down stays as exported
    (and runs: decode-low-bit decodes the codes at run time)."""
    model = moe_model(coded=(None, "fp8"))
    graph, before, result = _fuse(model)
    assert not result.counts and format_graph(graph) == before
    assert any("not all computed from codes of one format" in n for n in result.notes), result.notes
    PassManager(["decode-low-bit"]).run(graph)
    assert not any(n.op_type == "Cast" and n.inputs[0].dtype.name == "f8e4m3" for n in graph.nodes)
    _assert_same_numerics(model, graph)


# ---- (b) near misses -------------------------------------------------------------------------

NEAR_MISSES = {
    # name: (builder kwargs, words the note must contain)
    "scores_output": (dict(near_miss="scores_output"), "router scores"),
    "expert_switch": (dict(near_miss="expert_switch"), "same function"),
    "per_expert_scale": (dict(near_miss="per_expert_scale"), "not a bias added"),
    "group_max": (dict(scoring="sigmoid", bias=True, groups=(4, 2), near_miss="group_max"), "best two"),
    "fill_zero": (dict(scoring="sigmoid", bias=True, groups=(4, 2), near_miss="fill_zero"), "not -inf"),
    "up_clamp_mismatch": (dict(clamp=7.0, near_miss="up_clamp_mismatch"), "does not compute"),
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_near_miss_is_left_alone(case):
    kwargs, words = NEAR_MISSES[case]
    graph, before, result = _fuse(moe_model(**kwargs))
    assert not result.counts and not _moe_nodes(graph)
    assert format_graph(graph) == before
    assert any(words in note for note in result.notes), result.notes


def test_hash_layers_may_share_token_id_arithmetic():
    graph, _, result = _fuse(moe_model(scoring="sqrtsoftplus", hash_routing=True, near_miss="shared_ids"))
    assert result.counts["MoE"] == 1, result.notes
    (lookup,) = [n for n in graph.nodes if n.op_type == "GatherND"]
    assert lookup.outputs[0].name == "other"


def test_plain_topk_is_not_a_router():
    b = _Builder()
    scores = b.op("Softmax", b.op("MatMul", "x", b.const(np.ones((H, E), np.float32))), axis=-1)
    b.nodes.append(helper.make_node("TopK", [scores, b.ints(2)], ["values", "indices"], axis=-1))
    graph = helper.make_graph(b.nodes, "plain_topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    ["seq", H])],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["seq", 2]),
                               helper.make_tensor_value_info("indices", TensorProto.INT64, ["seq", 2])], b.inits)
    graph, before, result = _fuse(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    assert not result.counts and format_graph(graph) == before
    assert len(result.notes) == 1 and "select no expert weights" in result.notes[0]


def test_fuse_moe_is_in_the_default_pipeline():
    default = PIPELINES["default"]
    assert default.count("fuse-moe") == 1
    assert default.index("fuse-rotary") < default.index("fuse-moe") < default.index("fuse-gated-mlp")


# ---- (c) real exports ------------------------------------------------------------------------

def _models_dir() -> pathlib.Path | None:
    for d in (pathlib.Path(__file__).resolve().parents[2] / "examples" / "models", pathlib.Path("/tmp/m1")):
        if (d / "corpus.json").exists():
            return d
    return None


MODELS_DIR = _models_dir()
CORPUS = json.loads((MODELS_DIR / "corpus.json").read_text())["models"] if MODELS_DIR else {}


def _layer_kinds(cfg: dict) -> list[str]:
    """'dense', 'moe' or 'hash' for each decoder layer, as the HF modelling code decides it."""
    n = cfg["num_hidden_layers"]
    if cfg.get("mlp_layer_types"):                                    # DeepSeek-V4
        return [{"hash_moe": "hash", "moe": "moe"}.get(t, "dense") for t in cfg["mlp_layer_types"]]
    if "first_k_dense_replace" in cfg:                                # DeepSeek-V3
        return ["dense" if i < cfg["first_k_dense_replace"] else "moe" for i in range(n)]
    if "decoder_sparse_step" in cfg:                                  # Qwen3-MoE
        step, dense = cfg["decoder_sparse_step"], set(cfg.get("mlp_only_layers") or [])
        return ["moe" if i not in dense and (i + 1) % step == 0 else "dense" for i in range(n)]
    if cfg.get("num_local_experts"):                                  # Mixtral
        return ["moe"] * n
    return ["dense"] * n


def _expected_attrs(cfg: dict) -> dict:
    scoring = cfg.get("scoring_func") or {"deepseek_v3": "sigmoid"}.get(cfg["model_type"], "softmax")
    # Mixtral and DeepSeek-V4 always renormalise (V4's routers ignore norm_topk_prob)
    renormalize = cfg["model_type"] == "deepseek_v4" or cfg.get("norm_topk_prob", True)
    return dict(top_k=cfg["num_experts_per_tok"], scoring=scoring, n_group=cfg.get("n_group") or 1,
                topk_group=cfg.get("topk_group") or 1, renormalize=int(renormalize),
                routed_scaling=pytest.approx(cfg.get("routed_scaling_factor") or 1.0, rel=1e-6),
                activation="silu", clamp=float(cfg.get("swiglu_limit") or 0.0))


# The routers of the first five families, attribute by attribute; the families added since are checked
# by their fused-op counts and logits (tests/test_fusion_models.py).
MOE_MODELS = sorted(name for name, entry in CORPUS.items() if entry["family"] in families.FIRST_FAMILIES
                    and ("moe" in _layer_kinds(entry["hf_config"]) or "hash" in _layer_kinds(entry["hf_config"])))


@pytest.fixture(scope="module", params=MOE_MODELS or [pytest.param(None, marks=pytest.mark.skip("no corpus"))])
def fused_export(request):
    name = request.param
    graph = import_onnx(MODELS_DIR / f"{name}.onnx")
    PassManager(["canonicalize"]).run(graph)
    vocab = graph.outputs[0].shape[-1]
    rng = np.random.default_rng(0)
    feeds = {seq: {"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for seq in (7, 33)}
    before = {seq: ReferenceSession(graph).run(f)["logits"] for seq, f in feeds.items()}
    result = get_pass("fuse-moe").run(graph)
    verify(graph)
    return name, graph, result, feeds, before


def test_export_one_moe_per_moe_layer(fused_export):
    name, graph, result, _, _ = fused_export
    cfg = CORPUS[name]["hf_config"]
    kinds = [k for k in _layer_kinds(cfg) if k != "dense"]
    moes = _moe_nodes(graph)
    assert result.counts["MoE"] == len(moes) == len(kinds) == CORPUS[name]["num_moe_layers"], result.notes
    # the only notes allowed: top-ks that are no router (DeepSeek-V4's sparse-attention indexer)
    assert all("select no expert weights" in note for note in result.notes), result.notes
    num_experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts")
    for moe, kind in zip(moes, kinds):                      # graph order is layer order
        assert moe.attrs == _expected_attrs(cfg)
        assert moe.inputs[1].shape == (cfg["hidden_size"], num_experts)
        assert moe.inputs[3].shape == (num_experts, cfg["hidden_size"], cfg["moe_intermediate_size"]
                                       if "moe_intermediate_size" in cfg else cfg["intermediate_size"])
        is_hash = len(moe.inputs) > 6
        assert is_hash == (kind == "hash")
        if is_hash:   # token ids: the graph's input_ids, flattened to x's leading shape
            assert moe.inputs[6].shape == (cfg["vocab_size"], cfg["num_experts_per_tok"])
            assert moe.inputs[7].shape == moe.inputs[0].shape[:-1]
            assert moe.inputs[7].producer.inputs[0] is graph.inputs[0]
        wants_bias = cfg["model_type"].startswith("deepseek") and kind == "moe"
        assert (moe.inputs[2] is not None) == wants_bias


def test_export_keeps_no_router_or_expert_gathers(fused_export):
    name, graph, _, _, _ = fused_export
    cfg = CORPUS[name]["hf_config"]
    num_experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts")
    for node in graph.nodes:
        if node.op_type == "TopK":                          # e.g. an attention indexer's top-k over blocks
            assert node.inputs[0].shape[-1] != num_experts, f"{node.name} selects experts"
        if node.op_type in ("Softmax", "Sigmoid", "Softplus"):   # attention, dense MLPs, hyper-connections
            proj = node.inputs[0].producer
            router_shapes = ((cfg["hidden_size"], num_experts), (num_experts, cfg["hidden_size"]))
            assert not (proj is not None and proj.op_type in ("MatMul", "Gemm") and proj.inputs[1].const is not None
                        and proj.inputs[1].shape in router_shapes), f"{node.name} scores a router"
        if node.op_type in ("Gather", "GatherND"):
            data = node.inputs[0]
            assert not (data.const is not None and data.const.ndim == 3 and data.shape[0] == num_experts), \
                f"{node.name} still gathers expert weights"


@pytest.mark.parametrize("seq", (7, 33))
def test_export_numerics_unchanged(fused_export, seq):
    name, graph, _, feeds, before = fused_export
    got = ReferenceSession(graph, check_types=True).run(feeds[seq])["logits"]
    want = before[seq]
    err, scale = float(np.abs(got.astype(np.float64) - want).max()), float(np.abs(want).max())
    assert err <= 1e-4 * scale, f"{name} seq {seq}: max abs diff {err:.3g} > 1e-4 x max|logit| {scale:.3g}"

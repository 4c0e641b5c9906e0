"""Already-fused ONNX / ONNX Runtime ops import as polyport's fused ops (frontend/fused_import.py).

Each model is built with onnx.helper (ai.onnx opset 23; com.microsoft opset 1)
and checked two ways:
  (a) the imported graph contains the polyport op and none of the original op;
  (b) the reference executor's outputs equal ONNX Runtime's on the original model
      (CPU provider, graph optimisations off), in fp32, to a RELATIVE tolerance of
      1e-4 (plus an absolute 1e-4 x the output's largest magnitude, for elements
      near zero).
Where ONNX Runtime's CPU kernel lacks a form the op defines (MoE's fc3 or
non-interleaved SwiGLU, GroupQueryAttention's q/k norm), the oracle is ONNX
Runtime on an equivalent model that its CPU kernels do run; the test says so.
Features polyport cannot express raise UnsupportedOpError naming the node, the
op and the feature; the error tests check all three.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from polyport import errors
from polyport.frontend.onnx_import import import_onnx
from polyport.runtime.reference import ReferenceSession

ort = pytest.importorskip("onnxruntime")
ort.set_default_logger_severity(3)

MS = "com.microsoft"
RTOL = 1e-4   # relative tolerance against ONNX Runtime (fp32)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def _elem(x: np.ndarray) -> int:
    return {np.float32: TP.FLOAT, np.int32: TP.INT32, np.int64: TP.INT64, np.bool_: TP.BOOL}[x.dtype.type]


def make_model(nodes, feeds: dict, outputs, inits: dict | None = None, *, opset: int = 23, ms: bool = True,
               symbolic: dict | None = None):
    """A model whose inputs are `feeds` (shapes from the arrays, or names from `symbolic`)."""
    symbolic = symbolic or {}
    inputs = [oh.make_tensor_value_info(k, _elem(v), symbolic.get(k, list(v.shape))) for k, v in feeds.items()]
    outs = [oh.make_tensor_value_info(o, TP.FLOAT, None) for o in outputs]
    init = [onnx.numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    g = oh.make_graph(nodes, "g", inputs, outs, init)
    opsets = [oh.make_opsetid("", opset)] + ([oh.make_opsetid(MS, 1)] if ms else [])
    return oh.make_model(g, opset_imports=opsets, ir_version=10)


def ort_run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


class _OnnxReference:
    """Marker oracle: ONNX's own reference implementation (onnx.reference.ReferenceEvaluator)."""


onnx_ref = _OnnxReference()


def assert_close(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    atol = RTOL * max(float(np.abs(want).max(initial=0.0)), 1e-6)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol, err_msg=what)


def check(model, feeds, fused, original, oracle=None, compare=None):
    """Import `model`; (a) `fused` ops present, `original` ops gone; (b) reference == ONNX Runtime
    (on `oracle`, default the model itself). Returns the graph."""
    graph = import_onnx(model)
    ops = {n.qualified_op for n in graph.walk()}
    for op in fused:
        assert f"polyport::{op}" in ops, f"no polyport::{op} in {sorted(ops)}"
    for op in original:
        assert op not in ops, f"{op} left in the imported graph: {sorted(ops)}"
    got = ReferenceSession(graph, check_types=True).run(feeds)
    if oracle is onnx_ref:
        from onnx.reference import ReferenceEvaluator
        sess = ReferenceEvaluator(model)
        want = dict(zip(sess.output_names, sess.run(None, feeds)))
    else:
        want = ort_run(oracle if oracle is not None else model, feeds)
    for name in compare or [o.name for o in model.graph.output]:
        assert_close(got[name], want[name], name)
    return graph


def expect_error(model, *fragments):
    with pytest.raises(errors.UnsupportedOpError) as ei:
        import_onnx(model)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in error message: {msg}"
    return msg


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------
# RMSNormalization (ONNX 23), SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis,scale_shape,eps", [(-1, [8], None), (-1, [1, 1, 8], 1e-3), (1, [3, 8], 1e-4),
                                                  (-2, [8], 1e-2)])
def test_rms_normalization(rng, axis, scale_shape, eps):
    feeds = {"x": rand(rng, 2, 3, 8), "w": rand(rng, *scale_shape)}
    attrs = {"axis": axis} | ({"epsilon": eps} if eps is not None else {})
    n = oh.make_node("RMSNormalization", ["x", "w"], ["y"], name="norm", **attrs)
    check(make_model([n], feeds, ["y"], ms=False), feeds, ["RMSNorm"], ["RMSNormalization"])


def test_rms_normalization_other_stash_type_stays_standard(rng):
    """polyport::RMSNorm computes in fp32; stash_type=10 (fp16) keeps the standard op. onnx.reference
    does not implement that either, so running it fails with one error naming the node and the cause."""
    feeds = {"x": rand(rng, 2, 3, 8), "w": rand(rng, 8)}
    n = oh.make_node("RMSNormalization", ["x", "w"], ["y"], name="norm0", stash_type=10)
    graph = import_onnx(make_model([n], feeds, ["y"], ms=False))
    assert [node.qualified_op for node in graph.nodes] == ["RMSNormalization"]
    with pytest.raises(errors.ExecutionError, match="node norm0 \\(RMSNormalization\\) failed: .*stash_type=10"):
        ReferenceSession(graph).run(feeds)


@pytest.mark.parametrize("axis", [-1, 1])
def test_simplified_layer_norm_with_inv_std_var(rng, axis):
    # ONNX Runtime registers SimplifiedLayerNormalization in the ai.onnx domain (version 1).
    feeds = {"x": rand(rng, 2, 3, 8), "w": rand(rng, *([8] if axis == -1 else [3, 8]))}
    n = oh.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y", "inv"], name="sln", axis=axis, epsilon=1e-3)
    check(make_model([n], feeds, ["y", "inv"]), feeds, ["RMSNorm"], ["SimplifiedLayerNormalization"])


def test_simplified_layer_norm_com_microsoft_domain(rng):
    # Also accepted under com.microsoft (where ONNX Runtime does not run it): oracle is the ai.onnx form.
    feeds = {"x": rand(rng, 2, 3, 8), "w": rand(rng, 8)}
    ms_node = oh.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], name="sln", domain=MS)
    onnx_node = oh.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], name="sln")
    check(make_model([ms_node], feeds, ["y"]), feeds, ["RMSNorm"], [f"{MS}::SimplifiedLayerNormalization"],
          oracle=make_model([onnx_node], feeds, ["y"]))


@pytest.mark.parametrize("bias,skip_shape,outputs", [
    (True, [2, 3, 8], ["y", "", "", "sum"]),
    (True, [2, 3, 8], ["y", "", "inv", "sum"]),
    (False, [2, 3, 8], ["y"]),
    (False, [3, 8], ["y", "", "", "sum"]),
])
def test_skip_simplified_layer_norm(rng, bias, skip_shape, outputs):
    feeds = {"x": rand(rng, 2, 3, 8), "skip": rand(rng, *skip_shape), "gamma": rand(rng, 8)}
    ins = ["x", "skip", "gamma"]
    if bias:
        feeds["bias"] = rand(rng, 8)
        ins.append("bias")
    n = oh.make_node("SkipSimplifiedLayerNormalization", ins, outputs, name="ssln", domain=MS, epsilon=1e-5)
    check(make_model([n], feeds, [o for o in outputs if o]), feeds, ["RMSNorm"],
          [f"{MS}::SkipSimplifiedLayerNormalization"])


def test_skip_simplified_layer_norm_default_epsilon(rng):
    # com.microsoft's default epsilon here is 1e-12 (not 1e-5)
    feeds = {"x": rand(rng, 2, 3, 8, scale=1e-3), "skip": rand(rng, 2, 3, 8, scale=1e-3), "gamma": rand(rng, 8)}
    n = oh.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y"], name="ssln", domain=MS)
    graph = check(make_model([n], feeds, ["y"]), feeds, ["RMSNorm"], [f"{MS}::SkipSimplifiedLayerNormalization"])
    (norm,) = [n for n in graph.nodes if n.op_type == "RMSNorm"]
    assert norm.attrs["epsilon"] == pytest.approx(1e-12)


def test_skip_simplified_layer_norm_mean_output_error(rng):
    feeds = {"x": rand(rng, 2, 3, 8), "skip": rand(rng, 2, 3, 8), "gamma": rand(rng, 8)}
    n = oh.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y", "mean"], name="ssln7",
                     domain=MS)
    expect_error(make_model([n], feeds, ["y", "mean"]), "node ssln7", f"{MS}::SkipSimplifiedLayerNormalization",
                 "output 1 (mean")


# ---------------------------------------------------------------------------------------
# RotaryEmbedding (ONNX 23 and com.microsoft)
# ---------------------------------------------------------------------------------------

B, S, N, D, MAXPOS = 2, 3, 2, 8, 10


@pytest.mark.parametrize("layout", ["bhsd", "bsh"])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [0, 4])
@pytest.mark.parametrize("with_positions", [True, False])
def test_onnx_rotary_embedding(rng, layout, interleaved, rotary_dim, with_positions):
    half = (rotary_dim or D) // 2
    x = rand(rng, B, N, S, D) if layout == "bhsd" else rand(rng, B, S, N * D)
    if with_positions:
        feeds = {"x": x, "cos": rand(rng, MAXPOS, half), "sin": rand(rng, MAXPOS, half),
                 "pos": rng.integers(0, MAXPOS, (B, S)).astype(np.int64)}
    else:   # caches already gathered: [B, S, rd/2]
        feeds = {"x": x, "cos": rand(rng, B, S, half), "sin": rand(rng, B, S, half)}
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rotary_dim}
    if layout == "bsh":
        attrs["num_heads"] = N
    n = oh.make_node("RotaryEmbedding", list(feeds), ["y"], name="rope", **attrs)
    check(make_model([n], feeds, ["y"], ms=False), feeds, ["Rotary"], ["RotaryEmbedding"])


@pytest.mark.parametrize("layout", ["bhsd", "bsh"])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [0, 4])
def test_ms_rotary_embedding(rng, layout, interleaved, rotary_dim):
    half = (rotary_dim or D) // 2
    x = rand(rng, B, N, S, D) if layout == "bhsd" else rand(rng, B, S, N * D)
    feeds = {"x": x, "pos": rng.integers(0, MAXPOS, (B, S)).astype(np.int64),
             "cos": rand(rng, MAXPOS, half), "sin": rand(rng, MAXPOS, half)}
    attrs = {"interleaved": interleaved}
    if rotary_dim:
        attrs.update(rotary_embedding_dim=rotary_dim, num_heads=N)
    n = oh.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], name="rope", domain=MS, **attrs)
    check(make_model([n], feeds, ["y"]), feeds, ["Rotary"], [f"{MS}::RotaryEmbedding"])


def test_ms_rotary_embedding_position_offset(rng):
    # position_ids of shape [1]: positions offset + 0..S-1; sequence length symbolic
    feeds = {"x": rand(rng, B, S, N * D), "pos": np.array([4], np.int64),
             "cos": rand(rng, MAXPOS, D // 2), "sin": rand(rng, MAXPOS, D // 2)}
    n = oh.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], name="rope", domain=MS)
    model = make_model([n], feeds, ["y"], symbolic={"x": ["batch", "seq", N * D]})
    check(model, feeds, ["Rotary"], [f"{MS}::RotaryEmbedding"])


@pytest.mark.parametrize("attr,fragment", [({"is_packed_batching": 1}, "is_packed_batching=1"),
                                           ({"scale": 0.5}, "scale=0.5")])
def test_ms_rotary_embedding_errors(rng, attr, fragment):
    feeds = {"x": rand(rng, B, S, N * D), "pos": np.array([0], np.int64),
             "cos": rand(rng, MAXPOS, D // 2), "sin": rand(rng, MAXPOS, D // 2)}
    n = oh.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], name="rope3", domain=MS, **attr)
    expect_error(make_model([n], feeds, ["y"]), "node rope3", f"{MS}::RotaryEmbedding", fragment)


# ---------------------------------------------------------------------------------------
# Attention (ONNX 23)
# ---------------------------------------------------------------------------------------

def _bool_mask(rng, *shape):
    m = rng.random(shape) > 0.3
    m[..., 0] = True          # no fully-masked row (see test_onnx_attention_fully_masked_row)
    return m


@pytest.mark.parametrize("case", ["mha_4d", "causal_4d", "gqa_3d_causal_float_mask", "mqa_3d_bool_mask",
                                  "scale_vdim", "cross_causal", "cross"])
def test_onnx_attention(rng, case):
    b, s, t, d = 2, 4, 4, 8
    if case == "mha_4d":
        feeds = {"q": rand(rng, b, 2, s, d), "k": rand(rng, b, 2, t, d), "v": rand(rng, b, 2, t, d)}
        attrs = {}
    elif case == "causal_4d":
        feeds = {"q": rand(rng, b, 2, s, d), "k": rand(rng, b, 2, t, d), "v": rand(rng, b, 2, t, d)}
        attrs = {"is_causal": 1}
    elif case == "gqa_3d_causal_float_mask":
        feeds = {"q": rand(rng, b, s, 4 * d), "k": rand(rng, b, t, 2 * d), "v": rand(rng, b, t, 2 * d),
                 "m": rand(rng, b, 1, s, t)}
        attrs = {"is_causal": 1, "q_num_heads": 4, "kv_num_heads": 2, "scale": 0.3}
    elif case == "mqa_3d_bool_mask":
        feeds = {"q": rand(rng, b, s, 4 * d), "k": rand(rng, b, t, d), "v": rand(rng, b, t, d),
                 "m": _bool_mask(rng, s, t)}
        attrs = {"q_num_heads": 4, "kv_num_heads": 1}
    elif case == "scale_vdim":
        feeds = {"q": rand(rng, b, 2, s, d), "k": rand(rng, b, 2, t, d), "v": rand(rng, b, 2, t, 6)}
        attrs = {"scale": 0.7, "is_causal": 1}
    elif case == "cross_causal":   # S != T: the spec's top-left alignment (j <= i), built as a mask
        t = 6
        feeds = {"q": rand(rng, b, 2, s, d), "k": rand(rng, b, 2, t, d), "v": rand(rng, b, 2, t, d),
                 "m": _bool_mask(rng, b, 1, s, t)}
        attrs = {"is_causal": 1}
    else:
        t = 6
        feeds = {"q": rand(rng, b, s, 2 * d), "k": rand(rng, b, t, 2 * d), "v": rand(rng, b, t, 2 * d)}
        attrs = {"q_num_heads": 2, "kv_num_heads": 2}
    n = oh.make_node("Attention", list(feeds), ["y"], name="attn", **attrs)
    check(make_model([n], feeds, ["y"], ms=False), feeds, ["Attention"], ["Attention"])


@pytest.mark.parametrize("kv_len", [2, 3])
def test_onnx_attention_kv_cache(rng, kv_len):
    # past_key/past_value concatenate; present_key/value are outputs; is_causal offsets by the past
    b, h, s, p, d = 2, 2, 2, 3, 8
    feeds = {"q": rand(rng, b, h, s, d), "k": rand(rng, b, h, kv_len, d), "v": rand(rng, b, h, kv_len, d),
             "pk": rand(rng, b, h, p, d), "pv": rand(rng, b, h, p, d)}
    n = oh.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "present_k", "present_v"], name="attn",
                     is_causal=1)
    check(make_model([n], feeds, ["y", "present_k", "present_v"], ms=False), feeds, ["Attention"], ["Attention"])


def test_onnx_attention_symbolic_seq(rng):
    feeds = {"q": rand(rng, 1, 5, 16), "k": rand(rng, 1, 5, 8), "v": rand(rng, 1, 5, 8)}
    n = oh.make_node("Attention", ["q", "k", "v"], ["y"], name="attn", is_causal=1, q_num_heads=2, kv_num_heads=1)
    sym = {"q": ["batch", "seq", 16], "k": ["batch", "seq", 8], "v": ["batch", "seq", 8]}
    graph = check(make_model([n], feeds, ["y"], ms=False, symbolic=sym), feeds, ["Attention"], ["Attention"])
    (att,) = [n for n in graph.nodes if n.op_type == "Attention"]
    assert att.attrs["causal"] == 1 and len(att.inputs) == 3     # bottom-right == top-left: no explicit mask


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_onnx_attention_fully_masked_row(rng):
    """ONNX (opset-23 errata) and ONNX Runtime give a zero row where every key is masked; the row here
    is checked only for not being compared (polyport::Attention's reference gives NaN there)."""
    feeds = {"q": rand(rng, 1, 2, 3, 8), "k": rand(rng, 1, 2, 3, 8), "v": rand(rng, 1, 2, 3, 8)}
    mask = np.ones((3, 3), bool)
    mask[1] = False
    feeds["m"] = mask
    n = oh.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="attn")
    model = make_model([n], feeds, ["y"], ms=False)
    got = ReferenceSession(import_onnx(model)).run(feeds)["y"]
    want = ort_run(model, feeds)["y"]
    assert np.all(want[:, :, 1] == 0)
    keep = [0, 2]
    assert_close(got[:, :, keep], want[:, :, keep], "rows with a visible key")


@pytest.mark.parametrize("attrs,outputs", [
    ({"qk_matmul_output_mode": 3}, ["y", "", "", "qk"]),
])
def test_onnx_attention_polyport_cannot_express_stays_standard(rng, attrs, outputs):
    """The qk output has no polyport::Attention form: the node stays a standard Attention (not
    fused), which the reference executor runs as ONNX defines it."""
    feeds = {"q": rand(rng, 1, 2, 3, 8), "k": rand(rng, 1, 2, 3, 8), "v": rand(rng, 1, 2, 3, 8)}
    n = oh.make_node("Attention", ["q", "k", "v"], outputs, name="attn9", **attrs)
    model = make_model([n], feeds, [o for o in outputs if o], ms=False)
    graph = import_onnx(model)
    assert [node.qualified_op for node in graph.nodes] == ["Attention"]
    got = ReferenceSession(graph).run(feeds)
    want = onnx.reference.ReferenceEvaluator(model).run(None, feeds)
    for name, w in zip([o for o in outputs if o], want):
        assert_close(got[name], w, name)


@pytest.mark.parametrize("causal", [0, 1])
def test_onnx_attention_nonpad_kv_seqlen(rng, causal):
    # opset 24: keys j >= nonpad_kv_seqlen[b] masked; causal offset nonpad_kv_seqlen[b] - S per batch entry
    feeds = {"q": rand(rng, 2, 2, 3, 8), "k": rand(rng, 2, 2, 6, 8), "v": rand(rng, 2, 2, 6, 8),
             "n": np.array([4, 6], np.int64)}
    n = oh.make_node("Attention", ["q", "k", "v", "", "", "", "n"], ["y"], name="attn", is_causal=causal)
    check(make_model([n], feeds, ["y"], ms=False, opset=24), feeds, ["Attention"], ["Attention"])


@pytest.mark.parametrize("causal,left,right,past", [(1, 1, -1, False), (0, 2, 1, False), (0, -1, 0, False),
                                                    (0, 1, 1, True), (1, 2, -1, True)])
def test_onnx_attention_windows(rng, causal, left, right, past):
    """Opset 25 left/right_window_size. ONNX Runtime does not know opset-25 Attention yet, so the oracle
    is ONNX's own reference implementation (onnx.reference); same 1e-4 relative tolerance."""
    feeds = {"q": rand(rng, 2, 2, 4, 8), "k": rand(rng, 2, 2, 4, 8), "v": rand(rng, 2, 2, 4, 8)}
    ins = ["q", "k", "v"]
    if past:
        feeds.update(pk=rand(rng, 2, 2, 3, 8), pv=rand(rng, 2, 2, 3, 8))
        ins += ["", "pk", "pv"]
    n = oh.make_node("Attention", ins, ["y"], name="attn", is_causal=causal, left_window_size=left,
                     right_window_size=right)
    check(make_model([n], feeds, ["y"], ms=False, opset=25), feeds, ["Attention"], ["Attention"], oracle=onnx_ref)


@pytest.mark.parametrize("dtype", [np.bool_, np.float32])
def test_onnx_attention_short_mask(rng, dtype):
    """A mask shorter than the keys is padded with False / -inf (the ONNX reference implementation and the
    opset-24 text; ONNX Runtime rejects such a mask), so the oracle is onnx.reference."""
    feeds = {"q": rand(rng, 1, 2, 3, 8), "k": rand(rng, 1, 2, 5, 8), "v": rand(rng, 1, 2, 5, 8),
             "m": _bool_mask(rng, 3, 3) if dtype == np.bool_ else rand(rng, 3, 3)}
    n = oh.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="attn")
    sym = {"k": [1, 2, "kv", 8], "v": [1, 2, "kv", 8]} if dtype == np.bool_ else {}   # runtime / static padding
    model = make_model([n], feeds, ["y"], ms=False, opset=24, symbolic=sym)
    check(model, feeds, ["Attention"], ["Attention"], oracle=onnx_ref)


def test_onnx_attention_before_opset23_is_unknown(rng):
    feeds = {"q": rand(rng, 1, 2, 3, 8), "k": rand(rng, 1, 2, 3, 8), "v": rand(rng, 1, 2, 3, 8)}
    n = oh.make_node("Attention", ["q", "k", "v"], ["y"], name="attn22")
    expect_error(make_model([n], feeds, ["y"], ms=False, opset=22), "node attn22", "unknown op 'Attention'",
                 "opset 22")


# ---------------------------------------------------------------------------------------
# MultiHeadAttention (com.microsoft)
# ---------------------------------------------------------------------------------------

def _mha(feeds, inputs, outputs=("y",), **attrs):
    n = oh.make_node("MultiHeadAttention", list(inputs), list(outputs), name="mha", domain=MS, num_heads=2, **attrs)
    return make_model([n], feeds, [o for o in outputs if o])


@pytest.mark.parametrize("case", ["plain", "unidirectional_scale", "bias", "kpm_2d", "kpm_1d", "kpm_3d",
                                  "attention_bias", "bnsh_kv", "vdim"])
def test_ms_multi_head_attention(rng, case):
    b, s, h, d = 2, 3, 2, 4
    feeds = {"q": rand(rng, b, s, h * d), "k": rand(rng, b, s, h * d), "v": rand(rng, b, s, h * d)}
    inputs, attrs = ["q", "k", "v"], {}
    if case == "unidirectional_scale":
        attrs = {"unidirectional": 1, "scale": 0.6}
    elif case == "bias":
        feeds["bias"] = rand(rng, 3 * h * d)
        inputs.append("bias")
    elif case.startswith("kpm"):
        if case == "kpm_2d":
            feeds["kpm"] = np.array([[1, 1, 0], [1, 0, 1]], np.int32)
        elif case == "kpm_1d":
            feeds["kpm"] = np.array([2, 3], np.int32)
        else:
            m = rng.integers(0, 2, (b, s, s)).astype(np.int32)
            m[..., 0] = 1
            feeds["kpm"] = m
        inputs += ["", "kpm"]
        attrs = {"mask_filter_value": -5.0, "unidirectional": 1}
    elif case == "attention_bias":
        feeds["ab"] = rand(rng, 1, h, s, s)
        inputs += ["", "", "ab"]
        attrs = {"unidirectional": 1}
    elif case == "bnsh_kv":   # cross attention with keys/values already [B, N, T, H]
        feeds["k"], feeds["v"] = rand(rng, b, h, 5, d), rand(rng, b, h, 5, d)
    elif case == "vdim":
        feeds["v"] = rand(rng, b, s, h * 6)
    check(_mha(feeds, inputs, **attrs), feeds, ["Attention"], [f"{MS}::MultiHeadAttention"])


def test_ms_multi_head_attention_kv_cache(rng):
    b, s, h, d, p = 2, 3, 2, 4, 2
    feeds = {"q": rand(rng, b, s, h * d), "k": rand(rng, b, s, h * d), "v": rand(rng, b, s, h * d),
             "kpm": np.array([[1, 1, 1, 0, 1], [0, 1, 1, 1, 1]], np.int32),
             "pk": rand(rng, b, h, p, d), "pv": rand(rng, b, h, p, d)}
    model = _mha(feeds, ["q", "k", "v", "", "kpm", "", "pk", "pv"], ("y", "present_k", "present_v"),
                 unidirectional=1)
    check(model, feeds, ["Attention"], [f"{MS}::MultiHeadAttention"])


@pytest.mark.parametrize("case,fragment", [
    ("cross_unidirectional", "unidirectional=1 with kv_sequence_length != sequence_length"),
    ("packed_qkv", "packed QKV"),
    ("qk_output", "output qk"),
    ("past_sequence_length", "past_sequence_length"),
])
def test_ms_multi_head_attention_errors(rng, case, fragment):
    b, s, h, d = 2, 3, 2, 4
    feeds = {"q": rand(rng, b, s, h * d), "k": rand(rng, b, s, h * d), "v": rand(rng, b, s, h * d)}
    inputs, outputs, attrs = ["q", "k", "v"], ("y",), {}
    if case == "cross_unidirectional":
        feeds["k"], feeds["v"] = rand(rng, b, 5, h * d), rand(rng, b, 5, h * d)
        attrs = {"unidirectional": 1}
    elif case == "packed_qkv":
        feeds = {"q": rand(rng, b, s, h, 3, d)}
        inputs = ["q"]
    elif case == "qk_output":
        outputs = ("y", "", "", "qk")
    else:
        feeds.update(pk=rand(rng, b, h, 8, d), pv=rand(rng, b, h, 8, d), psl=np.array([2], np.int32))
        inputs += ["", "", "", "pk", "pv", "psl"]
    expect_error(_mha(feeds, inputs, outputs, **attrs), "node mha", f"{MS}::MultiHeadAttention", fragment)


# ---------------------------------------------------------------------------------------
# GroupQueryAttention (com.microsoft), prompt form
# ---------------------------------------------------------------------------------------

def _gqa_feeds(rng, b=2, s=4, nq=4, nkv=2, d=8, seqlens=None):
    feeds = {"q": rand(rng, b, s, nq * d), "k": rand(rng, b, s, nkv * d), "v": rand(rng, b, s, nkv * d),
             "seqlens_k": np.asarray(seqlens if seqlens is not None else [s - 1] * b, np.int32),
             "total_len": np.array(s, np.int32)}
    return feeds


def _gqa(feeds, extra=(), outputs=("y",), nq=4, nkv=2, **attrs):
    """GQA node over q, k, v, -, -, seqlens_k, total_len, then `extra` optional inputs (names or '')."""
    inputs = ["q", "k", "v", "", "", "seqlens_k", "total_len"] + list(extra)
    n = oh.make_node("GroupQueryAttention", inputs, list(outputs), name="gqa", domain=MS, num_heads=nq,
                     kv_num_heads=nkv, **attrs)
    return make_model([n], feeds, [o for o in outputs if o])


@pytest.mark.parametrize("case", ["causal", "mqa", "non_causal", "scale", "window1", "window2", "ragged",
                                  "head_sink", "smooth_softmax", "attention_bias", "present"])
def test_ms_group_query_attention(rng, case):
    nq, nkv, attrs, extra, outputs = 4, 2, {}, [], ("y",)
    feeds = _gqa_feeds(rng, nkv=1 if case == "mqa" else 2, seqlens=[3, 1] if case == "ragged" else None)
    if case == "mqa":
        nkv = 1
    elif case == "non_causal":
        attrs = {"causal": 0}
    elif case == "scale":
        attrs = {"scale": 0.3}
    elif case.startswith("window"):
        attrs = {"local_window_size": int(case[-1])}
    elif case == "head_sink":
        feeds["sink"] = rand(rng, nq)
        extra = ["", "", "", "", "sink"]
    elif case == "smooth_softmax":
        attrs = {"smooth_softmax": 1}
    elif case == "attention_bias":
        feeds["ab"] = rand(rng, 2, 1, 4, 4)
        extra = ["", "", "", "ab"]
    elif case == "present":
        outputs = ("y", "present_k", "present_v")
    model = _gqa(feeds, extra, outputs, nq=nq, nkv=nkv, **attrs)
    check(model, feeds, ["Attention"], [f"{MS}::GroupQueryAttention"])


def test_ms_group_query_attention_softcap(rng):
    """softcap: c * tanh(scores / c) on the scaled scores, before the causal mask (polyport's `softcap`)."""
    feeds = _gqa_feeds(rng)
    graph = check(_gqa(feeds, softcap=1.5), feeds, ["Attention"], [f"{MS}::GroupQueryAttention"])
    assert [n.attrs["softcap"] for n in graph.nodes if n.op_type == "Attention"] == [1.5]


@pytest.mark.parametrize("causal", [0, 1])
def test_onnx_attention_softcap(rng, causal):
    feeds = {"q": rand(rng, 1, 2, 3, 8), "k": rand(rng, 1, 2, 5, 8), "v": rand(rng, 1, 2, 5, 8),
             "m": rand(rng, 1, 1, 3, 5)}
    n = oh.make_node("Attention", ["q", "k", "v", "m"], ["y"], name="attn", softcap=2.0, is_causal=causal)
    graph = check(make_model([n], feeds, ["y"], ms=False), feeds, ["Attention"], ["Attention"])
    assert [n.attrs["softcap"] for n in graph.nodes if n.op_type == "Attention"] == [2.0]


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_ms_group_query_attention_rotary(rng, interleaved, rotary_dim):
    # do_rotary=1: polyport::Rotary on q and k first (ONNX Runtime's CPU kernel wants head_size % 16 == 0)
    d = 32
    feeds = _gqa_feeds(rng, d=d)
    feeds.update(cos=rand(rng, 12, rotary_dim // 2), sin=rand(rng, 12, rotary_dim // 2))
    model = _gqa(feeds, ["cos", "sin"], ("y", "present_k", "present_v"), do_rotary=1,
                 rotary_interleaved=interleaved)
    check(model, feeds, ["Attention", "Rotary"], [f"{MS}::GroupQueryAttention"])


def test_ms_group_query_attention_rotary_position_ids(rng):
    # for a prompt ONNX Runtime reads only position_ids[0, 0]: positions position_ids[0, 0] + 0..S-1
    feeds = _gqa_feeds(rng, d=32)
    feeds.update(cos=rand(rng, 12, 16), sin=rand(rng, 12, 16), pos=np.array([[3, 1, 7, 2], [5, 0, 0, 4]], np.int64))
    model = _gqa(feeds, ["cos", "sin", "pos"], do_rotary=1)
    check(model, feeds, ["Attention", "Rotary"], [f"{MS}::GroupQueryAttention"])


def test_ms_group_query_attention_packed_qkv(rng):
    feeds = _gqa_feeds(rng, d=32)
    feeds["qkv"] = np.concatenate([feeds.pop("q"), feeds.pop("k"), feeds.pop("v")], axis=-1)
    feeds = {"qkv": feeds.pop("qkv"), **feeds}
    feeds.update(cos=rand(rng, 12, 16), sin=rand(rng, 12, 16))
    n = oh.make_node("GroupQueryAttention", ["qkv", "", "", "", "", "seqlens_k", "total_len", "cos", "sin"], ["y"],
                     name="gqa", domain=MS, num_heads=4, kv_num_heads=2, do_rotary=1)
    check(make_model([n], feeds, ["y"]), feeds, ["Attention", "Rotary"], [f"{MS}::GroupQueryAttention"])


def test_ms_group_query_attention_qk_norm(rng):
    """q_norm_weight/k_norm_weight: per-head RMS norm before rotary. ONNX Runtime's CPU kernel rejects
    these inputs, so the oracle is ONNX Runtime on the decomposed model (SimplifiedLayerNormalization
    over each head of q and k, then GroupQueryAttention without them)."""
    b, s, nq, nkv, d = 2, 4, 4, 2, 32
    feeds = _gqa_feeds(rng, b, s, nq, nkv, d)
    feeds.update(cos=rand(rng, 12, 16), sin=rand(rng, 12, 16), qn=rand(rng, d), kn=rand(rng, d))
    eps = 1e-5
    fused = _gqa(feeds, ["cos", "sin", "", "", "", "", "", "qn", "kn"], do_rotary=1, qk_norm_epsilon=eps)
    nodes = []
    for x, w, heads in (("q", "qn", nq), ("k", "kn", nkv)):
        nodes += [oh.make_node("Reshape", [x, f"{x}_split"], [f"{x}4"]),
                  oh.make_node("SimplifiedLayerNormalization", [f"{x}4", w], [f"{x}4n"], epsilon=eps),
                  oh.make_node("Reshape", [f"{x}4n", f"{x}_merge"], [f"{x}_normed"])]
    nodes.append(oh.make_node("GroupQueryAttention", ["q_normed", "k_normed", "v", "", "", "seqlens_k", "total_len", "cos", "sin"],
                              ["y"], domain=MS, num_heads=nq, kv_num_heads=nkv, do_rotary=1))
    inits = {"q_split": np.array([0, 0, nq, d], np.int64), "k_split": np.array([0, 0, nkv, d], np.int64),
             "q_merge": np.array([0, 0, -1], np.int64), "k_merge": np.array([0, 0, -1], np.int64)}
    oracle = make_model(nodes, feeds, ["y"], inits)
    graph = import_onnx(fused)
    assert sum(n.op_type == "RMSNorm" for n in graph.nodes) == 2
    check(fused, feeds, ["Attention", "Rotary", "RMSNorm"], [f"{MS}::GroupQueryAttention"], oracle=oracle)


@pytest.mark.parametrize("case,fragment", [
    ("past", "past_key/past_value"),
    ("qk_output", "qk_output=1"),
    ("quantized", "quantized KV cache"),
])
def test_ms_group_query_attention_errors(rng, case, fragment):
    feeds = _gqa_feeds(rng)
    extra, attrs = [], {}
    if case == "past":
        feeds = {**feeds, "pk": rand(rng, 2, 2, 3, 8), "pv": rand(rng, 2, 2, 3, 8)}
        n = oh.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total_len"],
                         ["y", "present_k", "present_v"], name="gqa", domain=MS, num_heads=4, kv_num_heads=2)
        model = make_model([n], feeds, ["y", "present_k", "present_v"])
    else:
        if case == "qk_output":
            attrs = {"qk_output": 1}
        else:
            attrs = {"k_quant_type": "PER_TENSOR"}
        model = _gqa(feeds, extra, **attrs)
    expect_error(model, "node gqa", f"{MS}::GroupQueryAttention", fragment)


# ---------------------------------------------------------------------------------------
# MoE (com.microsoft)
# ---------------------------------------------------------------------------------------

T_, H_, I_, E_ = 6, 8, 12, 4


def _moe_model(rng, *, x_shape=(T_, H_), act="swiglu", fusion=1, fc3=False, k=2, router="matmul", inits=None,
               **attrs):
    """x -> router MatMul -> (Reshape to [tokens, E]) -> MoE; expert weights are initializers."""
    inits = dict(inits or {})
    inits.setdefault("router_w", rand(rng, H_, E_))
    if act == "swiglu" and fusion in (1, 2):
        inits.setdefault("fc1", rand(rng, E_, 2 * I_, H_, scale=0.3))
    else:
        inits.setdefault("fc1", rand(rng, E_, I_, H_, scale=0.3))
    inits.setdefault("fc2", rand(rng, E_, H_, I_, scale=0.3))
    if fc3:
        inits.setdefault("fc3", rand(rng, E_, I_, H_, scale=0.3))
    nodes = []
    if router == "matmul":
        nodes.append(oh.make_node("MatMul", ["x", "router_w"], ["logits_raw"]))
    elif router == "gemm_transB":
        inits["router_wt"] = np.ascontiguousarray(inits.pop("router_w").T)
        nodes.append(oh.make_node("Reshape", ["x", "rows"], ["x2"]))
        nodes.append(oh.make_node("Gemm", ["x2", "router_wt"], ["logits_raw"], transB=1))
        inits["rows"] = np.array([-1, H_], np.int64)
    nodes.append(oh.make_node("Reshape", ["logits_raw", "tokens_e"], ["logits"]))
    inits["tokens_e"] = np.array([-1, E_], np.int64)
    ins = ["x", "logits", "fc1", "", "fc2"] + (["", "fc3"] if fc3 else [])
    moe_attrs = {"k": k, "activation_type": act, **attrs}
    if act == "swiglu":
        moe_attrs["swiglu_fusion"] = fusion
    nodes.append(oh.make_node("MoE", ins, ["y"], name="moe", domain=MS, **moe_attrs))
    feeds = {"x": rand(rng, *x_shape)}
    return make_model(nodes, feeds, ["y"], inits), feeds, inits


def _interleaved(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """[E, I, H] gate and up -> [E, 2I, H] with rows g0, u0, g1, u1, ... (swiglu_fusion=1)."""
    w = np.empty((gate.shape[0], 2 * gate.shape[1], gate.shape[2]), np.float32)
    w[:, 0::2], w[:, 1::2] = gate, up
    return w


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("normalize", [0, 1])
def test_ms_moe_swiglu(rng, k, normalize):
    model, feeds, _ = _moe_model(rng, k=k, normalize_routing_weights=normalize)
    graph = check(model, feeds, ["MoE"], [f"{MS}::MoE"])
    (moe,) = [n for n in graph.nodes if n.op_type == "MoE"]
    assert moe.attrs["top_k"] == k and moe.attrs["renormalize"] == normalize
    assert not any(n.op_type == "MatMul" for n in graph.nodes), "the router MatMul is folded into polyport::MoE"


def test_ms_moe_swiglu_limit_3d_input(rng):
    model, feeds, _ = _moe_model(rng, x_shape=(2, 3, H_), swiglu_limit=0.5, normalize_routing_weights=1)
    graph = check(model, feeds, ["MoE"], [f"{MS}::MoE"])
    (moe,) = [n for n in graph.nodes if n.op_type == "MoE"]
    assert moe.attrs["clamp"] == pytest.approx(0.5)


def test_ms_moe_gemm_router(rng):
    model, feeds, _ = _moe_model(rng, x_shape=(2, 3, H_), router="gemm_transB")
    check(model, feeds, ["MoE"], [f"{MS}::MoE"])


def test_ms_moe_swiglu_concatenated(rng):
    """swiglu_fusion=2 (gate and up halves): ONNX Runtime's CPU kernel runs only the interleaved form,
    so the oracle is the same experts with fc1 interleaved (swiglu_fusion=1)."""
    gate, up = rand(rng, E_, I_, H_, scale=0.3), rand(rng, E_, I_, H_, scale=0.3)
    model, feeds, inits = _moe_model(rng, fusion=2, inits={"fc1": np.concatenate([gate, up], 1)})
    oracle, _, _ = _moe_model(rng, fusion=1, inits={**inits, "fc1": _interleaved(gate, up)})
    check(model, feeds, ["MoE"], [f"{MS}::MoE"], oracle=oracle)


@pytest.mark.parametrize("act,fusion", [("silu", 0), ("swiglu", 0)])
def test_ms_moe_fc3_gated(rng, act, fusion):
    """Gated experts with fc1 (gate) and fc3 (up), Mixtral style: ONNX Runtime's CPU kernel has no FC3,
    so the oracle is the same experts as an interleaved SwiGLU (swiglu_fusion=1)."""
    gate, up = rand(rng, E_, I_, H_, scale=0.3), rand(rng, E_, I_, H_, scale=0.3)
    model, feeds, inits = _moe_model(rng, act=act, fusion=fusion, fc3=True, inits={"fc1": gate, "fc3": up},
                                     normalize_routing_weights=1)
    oracle_inits = {k: v for k, v in inits.items() if k != "fc3"}
    oracle, _, _ = _moe_model(rng, fusion=1, inits={**oracle_inits, "fc1": _interleaved(gate, up)},
                              normalize_routing_weights=1)
    check(model, feeds, ["MoE"], [f"{MS}::MoE"], oracle=oracle)


@pytest.mark.parametrize("fusion", [1, 2])
def test_ms_moe_gpt_oss_swiglu_with_biases(rng, fusion):
    """gpt-oss: activation_alpha 1.702, activation_beta 1 (up + 1), swiglu_limit 7, fc1/fc2 biases -> polyport::MoE's
    alpha, up_offset, clamp and expert biases. ONNX Runtime's CPU kernel runs the interleaved form (the oracle for
    the halves)."""
    gate, up = rand(rng, E_, I_, H_, scale=0.3), rand(rng, E_, I_, H_, scale=0.3)
    bg, bu, b2 = rand(rng, E_, I_), rand(rng, E_, I_), rand(rng, E_, H_)
    attrs = dict(activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0, normalize_routing_weights=1)
    b1_interleaved = _interleaved(bg[..., None], bu[..., None])[..., 0]
    fc1, b1 = (np.concatenate([gate, up], 1), np.concatenate([bg, bu], 1)) if fusion == 2 else \
        (_interleaved(gate, up), b1_interleaved)
    models, shared = [], {"router_w": rand(rng, H_, E_), "fc2": rand(rng, E_, H_, I_, scale=0.3)}
    for f, w, b in ((fusion, fc1, b1), (1, _interleaved(gate, up), b1_interleaved)):
        model, feeds, _ = _moe_model(rng, fusion=f, inits={"fc1": w, "b1": b, "b2": b2, **shared}, **attrs)
        ins = model.graph.node[-1].input          # x, logits, fc1, fc1_bias, fc2, fc2_bias
        ins[3] = "b1"
        ins.append("b2")
        models.append((model, feeds))
    (model, feeds), (oracle, _) = models
    graph = check(model, feeds, ["MoE"], [f"{MS}::MoE"], oracle=oracle)
    (moe,) = [n for n in graph.nodes if n.op_type == "MoE"]
    assert moe.attrs["alpha"] == pytest.approx(1.702) and moe.attrs["up_offset"] == 1.0 and len(moe.inputs) == 15


@pytest.mark.parametrize("case,fragment", [
    ("relu", "activation_type='relu'"),
    ("ungated_silu", "activation_type 'silu' without fc3_experts_weights"),
    ("sparse_mixer", "use_sparse_mixer=1"),
    ("router_input", "router_probs"),
])
def test_ms_moe_errors(rng, case, fragment):
    if case == "relu":
        model, _, _ = _moe_model(rng, act="relu")
    elif case == "ungated_silu":
        model, _, _ = _moe_model(rng, act="silu")
    elif case == "sparse_mixer":
        model, _, _ = _moe_model(rng, use_sparse_mixer=1)
    else:   # router_probs fed as a graph input: no router weight to give polyport::MoE
        feeds = {"x": rand(rng, T_, H_), "logits": rand(rng, T_, E_)}
        n = oh.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], name="moe", domain=MS, k=2,
                         activation_type="swiglu", swiglu_fusion=1)
        model = make_model([n], feeds, ["y"], {"fc1": rand(rng, E_, 2 * I_, H_), "fc2": rand(rng, E_, H_, I_)})
    expect_error(model, "node moe", f"{MS}::MoE", fragment)


# ---------------------------------------------------------------------------------------
# the op check
# ---------------------------------------------------------------------------------------

def test_unknown_com_microsoft_op_is_an_error(rng):
    feeds = {"x": rand(rng, 2, 8)}
    n = oh.make_node("FancyNorm", ["x"], ["y"], name="fancy1", domain=MS)
    expect_error(make_model([n], feeds, ["y"]), "node fancy1", "'FancyNorm'", f"domain '{MS}'", "opset 1")


def test_fused_ops_leave_standard_graph_alone(rng):
    # standard nodes around a fused op import as before; graph output names are the file's
    feeds = {"x": rand(rng, 2, 3, 8), "w": rand(rng, 8)}
    nodes = [oh.make_node("Relu", ["x"], ["r"]),
             oh.make_node("RMSNormalization", ["r", "w"], ["n"], name="norm"),
             oh.make_node("Add", ["n", "x"], ["y"])]
    graph = check(make_model(nodes, feeds, ["y"], ms=False), feeds, ["RMSNorm"], ["RMSNormalization"])
    assert [v.name for v in graph.outputs] == ["y"]
    assert [n.name for n in graph.nodes if n.op_type == "RMSNorm"] == ["norm"]

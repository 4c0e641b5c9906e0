"""The ascend target: generated and checked here, numerics emulated on CPU, never run on Ascend.

What these tests check:
- every corpus export and the bundled deepseek_v3_tiny compile for ascend (the
  families added to the first five run `slow` but for a representative few, tests/families.py); the emitted ONNX passes onnx.checker (full_check) at opset <= 18
  and holds only CANN_ONNX_OPS in the default domain plus the mapped CANN operators
  (and polyport's Ascend C kernels) in their declared custom domains; weights are fp16;
- the op plan lists the graph's calls in order, with dtypes and symbolic shapes, and
  every fused op of the fused graph maps to its CANN operator chain;
- the emulated logits (fp16, fp32 accumulation) match the fp32 reference executor;
- graphs that break a documented CANN limit raise the named error or warn and fall back.

Tolerance: max |emulated - reference| <= 2e-2 * max |reference logit| on every
position. Justification: fp16 keeps 11 significant bits (unit
roundoff 4.9e-4); every op rounds its output to fp16 and these 2-4 layer models
chain ~20-40 such roundings between the embedding and the logits, which gives a
measured 0.9e-3 .. 1.9e-3 relative error on all models at 7 and 33 tokens. 2e-2 is
~10x that headroom, and still an order of magnitude below what a semantic mistake
costs (wrong mask, rotary mode, head mapping or routing: 0.1 .. 1 relative).
fp16 rounding may flip a near-tied expert choice (the device would flip it too, and a
flip in an early layer changes every later position): the reference is run with the
experts the emulator chose (its routing trace), weighted by the reference's own fp32
scores, so every position is compared and the routing itself is still checked (a wrong
choice would weigh an expert by a low score, and differ).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

from polyport.compiler import compile_model, signature
from polyport.frontend import import_onnx
from polyport.ir import dtypes
from polyport.ir.fused import compress as compress_fused
from polyport.ir.fused import moe as moe_fused
from polyport.ir.graph import Graph
from polyport.ir.symbolic import sym
from polyport.ir.types import TensorType
from polyport.passes.pipelines import run_pipeline
from polyport.runtime import ascend_emulator
from polyport.runtime.artifact import ArtifactWriter, read_manifest
from polyport.runtime.reference import ReferenceSession
from polyport.runtime.session import load
from polyport.targets import ascend
from polyport.targets.ascend.limits import AscendFallbackWarning, LimitError
from polyport.targets.base import CompileOptions, get_target

from .. import families
from ..real_models import BUNDLED, corpus, model_path

MODELS = sorted(corpus()) + ["deepseek_v3_tiny"]
TOL = 2e-2
_ROUTE = moe_fused.route          # the reference's routing, before a test forces the emulator's choices
SEQS = (7, 33)


def _path(name):
    return BUNDLED if name == "deepseek_v3_tiny" else model_path(name)


class _Built(dict):
    """name -> artifact path, each model compiled on first use (slow models only when their tests run)."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AscendFallbackWarning)   # MLA's v-padding fallback, checked below
            art = self[name] = compile_model(_path(name), ["ascend"], self.root / name)
        return art


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _Built(tmp_path_factory.mktemp("ascend"))


@pytest.fixture(scope="module")
def fused():
    graphs = {}

    def get(name):
        if name not in graphs:
            g = import_onnx(_path(name))
            run_pipeline(g)
            graphs[name] = g
        return graphs[name]
    return get


def test_families_present():
    assert {corpus()[m]["family"] for m in corpus()} >= {"deepseek_v3", "deepseek_v4", "llama", "mixtral",
                                                         "qwen3_moe"}


@pytest.mark.parametrize("name", families.params(MODELS, "ascend"))
def test_emitted_onnx_is_checked_and_allowed(built, name):
    art = built[name]
    model = onnx.load(str(art / "ascend" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] <= 18
    assert ascend.CANN_DOMAIN in opsets
    for n in model.graph.node:
        if n.domain in ("", "ai.onnx"):
            assert n.op_type in ascend.CANN_ONNX_OPS, n.op_type
        elif n.domain == ascend.CANN_DOMAIN:
            assert n.op_type in ascend.CANN_OPS, n.op_type
        else:
            assert n.domain == ascend.KERNEL_DOMAIN and n.op_type in ascend.POLYPORT_KERNELS, n
            assert n.domain in opsets
    # weights as on the device: every float matrix is fp16, except the fp32 MoE router weight
    router_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and
                      n.output[0].endswith("_router_logits")}
    for t in model.graph.initializer:
        if len(t.dims) >= 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            assert t.data_type == onnx.TensorProto.FLOAT16 or t.name in router_weights, t.name
    manifest = read_manifest(art)
    entry = manifest["targets"]["ascend"]
    assert "NOT run on an Ascend device" in entry["status"]
    assert "emulated on CPU (no Ascend device)" in entry["runtime"]
    atc = (art / "ascend" / "atc.sh").read_text()
    for flag in ("--framework=5", "--model=model.onnx", "--soc_version=Ascend910B3", "input_ids:1,-1",
                 "--input_shape_range", "--precision_mode"):
        assert flag in atc
    assert "NOT compiled with atc" in atc.splitlines()[2]


# The CANN calls each fused op must become, in this order (a kernel replaces MoeGatingTopK where CANN lacks it).
CHAINS = {
    "RMSNorm": ["RmsNorm"],
    "Rotary": ["RotaryPositionEmbedding"],
    "Attention": ["FusedInferAttentionScore"],
    "GatedMLP": ["SwiGlu"],
    "MoE": ["GATE", "MoeInitRoutingV2", "GroupedMatmul", "SwiGlu", "GroupedMatmul", "MoeFinalizeRoutingV2"],
}


STANDARD_CHAINS = ("KVCompress", "SparseIndexer")      # DeepSeek-V4's compressor and indexer (ascend/compress.py)


@pytest.mark.parametrize("name", families.params(MODELS, "ascend"))
def test_op_plan_covers_every_fused_op(built, fused, name):
    plan = json.loads((built[name] / "ascend" / "op_plan.json").read_text())
    calls = plan["calls"]
    model = onnx.load(str(built[name] / "ascend" / "model.onnx"))
    assert [c["name"] for c in calls] == [n.name for n in model.graph.node]
    by_node: dict[str, list[str]] = {}
    for c in calls:
        assert all(o["dtype"] and "shape" in o for o in c["outputs"])
        if c["from"] and c["kind"] != "onnx_standard_op":
            by_node.setdefault(c["from"]["node"], []).append(c["op"])
    g = fused(name)
    n_fused = 0
    for node in g.nodes:
        if node.domain != "polyport" or node.op_type == "ShapeValue":
            continue
        n_fused += 1
        got = by_node.get(node.name)
        if node.op_type in STANDARD_CHAINS:      # no CANN operator: the op's meaning as standard ops
            assert got is None and any(c["from"] and c["from"]["node"] == node.name for c in calls), node.name
            continue
        want = CHAINS[node.op_type]
        if node.op_type == "GatedMLP" and node.attrs.get("activation", "silu") != "silu":
            # CANN's SwiGlu is SiLU-only: a GeGLU is decomposed into standard ops, and the plan says so
            fallbacks = read_manifest(built[name])["targets"]["ascend"]["fallbacks"]
            assert got is None and any(f["node"] == node.name and f["cann_op"] == "SwiGlu"
                                       for f in fallbacks), (node.name, got)
            continue
        if node.op_type == "MoE" and node.attrs.get("alpha", 1.0) != 1.0:
            # gpt-oss's g * sigmoid(1.702 g) is no SwiGlu: decomposed between the GroupedMatmuls, and the plan says so
            fallbacks = read_manifest(built[name])["targets"]["ascend"]["fallbacks"]
            assert any(f["node"] == node.name and f["cann_op"] == "SwiGlu" for f in fallbacks), node.name
            want = [op for op in want if op != "SwiGlu"]
        if node.op_type == "Attention" and node.attrs.get("softcap", 0.0):
            # FusedInferAttentionScore has no soft-cap: Gemma 2's attention is decomposed, and the plan says so
            fallbacks = read_manifest(built[name])["targets"]["ascend"]["fallbacks"]
            assert got is None and any(f["node"] == node.name and f["limit"].startswith("softcap")
                                       for f in fallbacks), (node.name, got)
            continue
        assert got is not None, f"{node.name} ({node.op_type}) has no CANN call in the plan"
        if want[0] == "GATE" and node.attrs.get("routing") == "sparsemixer":
            want = want[1:]             # PhiMoE's gating has no CANN operator: standard ops (note in the plan)
        elif want[0] == "GATE":
            assert got[0] in ("MoeGatingTopK", "MoeGatingTopKSqrtSoftplus", "MoeHashRoutingGate")
            got = got[1:]
            want = want[1:]
        assert got == want, (node.name, got)
    assert n_fused > 0
    text = json.dumps(calls)
    assert '"seq"' in text                       # symbolic dims kept as text
    fia = [c for c in calls if c["op"] == "FusedInferAttentionScore"]
    assert len(fia) == sum(n.op_type == "Attention" and not n.attrs.get("softcap") for n in g.nodes) \
        and all(c["attributes"]["input_layout"] == "BNSD" and c["inputs"][0]["dtype"] == "float16" for c in fia)


def test_deepseek_v4_uses_polyport_kernels(built):
    art = built["deepseek_v4_a"] / "ascend"
    entry = read_manifest(built["deepseek_v4_a"])["targets"]["ascend"]
    assert entry["custom_kernels"] == ["MoeGatingTopKSqrtSoftplus", "MoeHashRoutingGate"]
    for stem in ("moe_gating_topk_sqrtsoftplus", "moe_hash_routing_gate"):
        desc = json.loads((art / "kernels" / f"{stem}.json").read_text())
        assert desc[0]["op"] and desc[0]["input_desc"] and desc[0]["output_desc"] and desc[0]["attr"]
        src = (art / "kernels" / f"{stem}.cpp").read_text()
        for word in ("TPipe", "TQue", "CopyIn", "Compute", "CopyOut", "TilingData", "__aicore__",
                     "NOT run on an Ascend device"):
            assert word in src, (stem, word)
    plan = json.loads((art / "op_plan.json").read_text())["calls"]
    fia = [c for c in plan if c["op"] == "FusedInferAttentionScore"]
    assert all(c["attributes"]["sparse_mode"] == 4 and c["attributes"]["pre_tokens"] == 15 and
               c["attributes"]["next_tokens"] == 0 and c["attributes"]["softmax_lse_flag"] == 1 for c in fia)


def routing_as_emulated(forced):
    """A `moe_fused.route` that takes the experts the emulator chose (`forced`: an iterator over its routing
    trace, one entry per MoE call) and weighs them by the reference's own fp32 scores."""
    def route(logits, attrs, e_bias=None, hash_table=None, token_ids=None):
        if attrs["routing"] == "sparsemixer":                # decomposed into standard ops: nothing traced
            return _ROUTE(logits, attrs, e_bias, hash_table, token_ids)
        chosen = np.asarray(next(forced)).astype(np.int64)   # the same experts, weighed by fp32 scores
        if hash_table is not None:                           # a fixed table: nothing for fp16 to flip
            idx, _ = _ROUTE(logits, attrs, e_bias, hash_table, token_ids)
            assert (np.sort(idx, -1) == np.sort(chosen, -1)).all()
        scores = moe_fused.SCORING[attrs["scoring"]](logits.astype(np.float32)).astype(np.float32)
        return chosen, moe_fused.routing_weights(scores, chosen, attrs["renormalize"], attrs["routed_scaling"])
    return route


def entries_as_emulated(forced):
    """A `compress.select_entries` that keeps the entries the emulator's sparse indexer chose (`forced`: its
    TopK indices [B, S, top_k], one per indexer call), of those a query may see."""
    def select(scores, positions, top_k, rate):
        entry = np.arange(scores.shape[-1])
        keep = (next(forced)[..., None] == entry).any(-2)          # indices past T: the padding's
        ready = (np.broadcast_to(np.asarray(positions, np.int64), scores.shape[:2]) + 1) // rate
        return keep & (entry[None, None, :] < ready[..., None])
    return select


def _compare(art, graph, seq, monkeypatch, seed=None):
    """max |emulated - reference| / max |reference|, the reference routed as the emulator routed and its
    sparse indexers keeping the entries the emulator's kept (near-ties of fp16 scores flip either)."""
    emu_trace, topk_trace = [], []
    monkeypatch.setattr(ascend_emulator, "ROUTING_TRACE", emu_trace)
    monkeypatch.setattr(ascend_emulator, "TOPK_TRACE", topk_trace)
    feeds = {"input_ids": np.random.default_rng(seq if seed is None else seed).integers(0, 100, (1, seq))
             .astype(np.int64)}
    got = load(art, target="ascend").run(feeds)["logits"]
    forced = iter(emu_trace)
    monkeypatch.setattr(moe_fused, "route", routing_as_emulated(forced))
    entries = iter([idx for name, idx in topk_trace if name.startswith("SparseIndexer")])
    monkeypatch.setattr(compress_fused, "select_entries", entries_as_emulated(entries))
    want = ReferenceSession(graph).run(feeds)["logits"]
    assert next(forced, None) is None, "the emulator routed more MoE layers than the reference"
    assert next(entries, None) is None, "the emulator ran more sparse indexers than the reference"
    assert got.dtype == np.float32 and got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", families.params(MODELS, "ascend"))
def test_emulated_logits_match_reference(built, fused, name, monkeypatch):
    for seq in SEQS:
        rel = _compare(built[name], fused(name), seq, monkeypatch)
        assert rel <= TOL, f"{name} seq {seq}: max diff {rel:.3g} x max|logit| > {TOL}"


def test_cli_run_says_emulated(built, cli):
    r = cli("run", str(built["llama_a"]), "--target", "ascend", "--seq", "4")
    assert r.exit_code == 0, r.stderr
    assert "logits" in r.stdout
    assert "emulated on CPU (no Ascend device)" in r.stderr


# ---- limits: small graphs that break one documented limit each ------------------------------------
def _attention_graph(head_dim: int, dv: int | None = None, dtype=dtypes.F32, mask=None, **attrs):
    g = Graph("attn")
    s = sym("seq")
    dv = dv or head_dim
    q = g.add_input("q", TensorType(dtype, (1, 2, s, head_dim)))
    k = g.add_input("k", TensorType(dtype, (1, 1, s, head_dim)))
    v = g.add_input("v", TensorType(dtype, (1, 1, s, dv)))
    ins = [q, k, v]
    if mask is not None:
        ins.append(g.add_input("mask", TensorType(mask, (1, 1, s, s))))
    a = {"num_heads": 2, "kv_heads": 1, "scale": head_dim ** -0.5, "causal": 1, "window": 0}
    a.update(attrs)
    n = g.make_node("Attention", ins, domain="polyport", attrs=a, name="attn",
                    types=[TensorType(dtype, (1, 2, s, dv))])
    g.set_outputs([n.outputs[0]])
    return g


def _moe_graph(experts: int, k: int, n_group: int = 1, topk_group: int = 1, scoring: str = "softmax",
               activation: str = "silu"):
    rng = np.random.default_rng(0)
    g = Graph("moe")
    h, i = 8, 8
    x = g.add_input("x", TensorType(dtypes.F32, (sym("seq"), h)))
    c = lambda name, *shape: g.add_constant(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))
    n = g.make_node("MoE", [x, c("router", h, experts), None, c("wg", experts, h, i), c("wu", experts, h, i),
                            c("wd", experts, i, h)], domain="polyport", name="moe",
                    attrs={"top_k": k, "scoring": scoring, "n_group": n_group, "topk_group": topk_group,
                           "renormalize": 1, "routed_scaling": 1.0, "activation": activation},
                    types=[x.type])
    g.set_outputs([n.outputs[0]])
    return g


def _lower(graph, tmp_path, dtype="f32"):
    tmp_path.mkdir(parents=True, exist_ok=True)      # artifacts are written only into existing folders
    weights = {v.name: v.const for v in graph.constants.values()}
    tmp_path.mkdir(parents=True, exist_ok=True)       # an artifact's parent directory must exist
    with ArtifactWriter(tmp_path / "art", signature(graph, graph.name)) as w:
        w.write_weights(weights)
        entry = get_target("ascend").lower(graph, w.target_dir("ascend"), weights, CompileOptions(dtype=dtype))
        w.add_target("ascend", entry)
        return w.commit(), entry


def test_head_dim_too_large_is_a_named_error(tmp_path):
    with pytest.raises(LimitError, match=r"node attn: CANN FusedInferAttentionScore requires head_dim <= 512, "
                                         r"got 1024"):
        _lower(_attention_graph(1024), tmp_path)


def test_unsupported_dtype_is_a_named_error(tmp_path):
    with pytest.raises(LimitError, match=r"node attn: CANN FusedInferAttentionScore requires dtype one of "
                                         r"\['float16', 'bfloat16'\], got 'float64'"):
        _lower(_attention_graph(16, dtype=dtypes.from_name("f64")), tmp_path)
    with pytest.raises(LimitError, match="compute dtype f64 is not supported"):
        _lower(_attention_graph(16), tmp_path, dtype="f64")


def _emulate_vs_reference(art, graph, feeds):
    want = ReferenceSession(graph).run(feeds)
    got = load(art, target="ascend").run(feeds)
    name = graph.outputs[0].name
    return float(np.abs(got[name] - want[name]).max() / np.abs(want[name]).max())


@pytest.mark.parametrize("experts,k,limit", [(1000, 2, "expert_count <= 512, got 1000"),
                                             (64, 40, "k <= 32, got 40")])
def test_gating_limits_fall_back_with_a_warning(tmp_path, experts, k, limit):
    g = _moe_graph(experts, k)
    with pytest.warns(AscendFallbackWarning, match=f"node moe: CANN MoeGatingTopK requires {limit}.*used fallback"):
        art, entry = _lower(g, tmp_path)
    assert entry["fallbacks"] and entry["fallbacks"][0]["cann_op"] == "MoeGatingTopK"
    assert read_manifest(art)["targets"]["ascend"]["fallbacks"][0]["node"] == "moe"
    ops = [c["op"] for c in json.loads((art / "ascend" / "op_plan.json").read_text())["calls"]]
    assert "MoeGatingTopK" not in ops and "TopK" in ops and "MoeInitRoutingV2" in ops
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    assert _emulate_vs_reference(art, g, {"x": x}) <= TOL


def test_group_limited_gating_past_the_limit_is_an_error(tmp_path):
    with pytest.raises(LimitError, match=r"node moe: CANN MoeGatingTopK requires expert_count <= 512, got 1000.*"
                                         r"does not do group-limited selection"):
        _lower(_moe_graph(1000, 2, n_group=4, topk_group=2, scoring="sigmoid"), tmp_path)
    with pytest.raises(LimitError, match=r"node moe: CANN GroupedMatmul requires group_count <= 1024, got 2048"):
        _lower(_moe_graph(2048, 2, scoring="sigmoid"), tmp_path)


def test_small_graph_paths_match_reference(tmp_path):
    """Paths the corpus does not reach: non-causal window, v head dim != q head dim, additive (pse_shift) and
    boolean (atten_mask) masks, partial interleaved rotary, gelu experts."""
    rng = np.random.default_rng(3)
    qkv = {n: rng.standard_normal(s).astype(np.float32) for n, s in
           (("q", (1, 2, 6, 16)), ("k", (1, 1, 6, 16)), ("v", (1, 1, 6, 16)))}
    g = _attention_graph(16, mask=dtypes.F32, causal=0)
    art, _ = _lower(g, tmp_path / "pse")
    plan = json.loads((art / "ascend" / "op_plan.json").read_text())["calls"]
    fia = next(c for c in plan if c["op"] == "FusedInferAttentionScore")
    assert fia["attributes"]["sparse_mode"] == 0 and fia["inputs"][3]["name"] == "mask__float16"
    assert _emulate_vs_reference(art, g, {**qkv, "mask": rng.standard_normal((1, 1, 6, 6)).astype(np.float32)}) \
        <= TOL
    g = _attention_graph(16, mask=dtypes.BOOL, causal=0)
    art, _ = _lower(g, tmp_path / "bool")
    keep = rng.random((1, 1, 6, 6)) > 0.3
    keep[..., 0] = True
    assert _emulate_vs_reference(art, g, {**qkv, "mask": keep}) <= TOL
    with pytest.raises(LimitError, match="boolean mask combined with causal"):
        _lower(_attention_graph(16, mask=dtypes.BOOL, causal=1), tmp_path / "bool_causal")
    g = Graph("rope")
    x = g.add_input("x", TensorType(dtypes.F32, (1, 2, sym("seq"), 16)))
    cos = g.add_input("cos", TensorType(dtypes.F32, (1, 1, sym("seq"), 8)))
    sin = g.add_input("sin", TensorType(dtypes.F32, (1, 1, sym("seq"), 8)))
    n = g.make_node("Rotary", [x, cos, sin], domain="polyport", attrs={"interleaved": 1, "rotary_dim": 8},
                    name="rope", types=[x.type])
    g.set_outputs([n.outputs[0]])
    art, _ = _lower(g, tmp_path / "rope")
    ang = rng.standard_normal((1, 1, 6, 4)).astype(np.float32)
    ang = np.repeat(ang, 2, axis=-1)
    assert _emulate_vs_reference(art, g, {"x": rng.standard_normal((1, 2, 6, 16)).astype(np.float32),
                                         "cos": np.cos(ang), "sin": np.sin(ang)}) <= TOL
    g = _attention_graph(16, dv=8, causal=0, window=3)
    with pytest.warns(AscendFallbackWarning, match="zero-padded"):
        art, _ = _lower(g, tmp_path / "a")
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in
             (("q", (1, 2, 6, 16)), ("k", (1, 1, 6, 16)), ("v", (1, 1, 6, 8)))}
    assert _emulate_vs_reference(art, g, feeds) <= TOL
    g = _moe_graph(8, 2, activation="gelu")
    with pytest.warns(AscendFallbackWarning, match="SwiGlu is SiLU-only"):
        art, _ = _lower(g, tmp_path / "b")
    assert _emulate_vs_reference(art, g, {"x": rng.standard_normal((5, 8)).astype(np.float32)}) <= TOL

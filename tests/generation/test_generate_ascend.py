"""Generation on the ascend target: the derived prefill/decode emitted as ATC-ready ONNX over paged KV caches,
emulated on CPU in float16 (no CANN toolkit or Ascend device exists here: generated, checked, emulated, not run).

Teacher forcing as in test_generate_cpu.py: `g.append(token)` one at a time on the emulated ascend session
reproduces the reference executor's derived programs (fp32) within the fp16 tolerance of passes/region.py
(2e-2 x max|logit|; measured 0.6e-3 .. 3.3e-3 on the corpus). Also: the programs' ONNX carry the caches as
inputs and outputs and pass onnx.checker; decode's plan writes with ScatterPaKvCache and reads with
FusedInferAttentionScore through block tables; a sliding-window layer lives in a ring of blocks. Default
run: llama_a (mha); the other cache layouts x prompt lengths 1, 7, 40 are slow, the limits check of every
corpus model's decode plan is `corpus`."""
from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import onnx
import pytest

import polyport
from polyport.ir import dtypes
from polyport.ir.fused import moe as moe_fused
from polyport.passes.region import tolerance
from polyport.runtime import ascend_emulator
from polyport.targets.ascend import CANN_DOMAIN, CANN_OPS, CANN_ONNX_OPS
from polyport.targets.ascend import limits as L
from polyport.targets.ascend.limits import AscendFallbackWarning, LimitError, check
from polyport.tests.real_models import corpus

from ..targets.test_ascend import routing_as_emulated
from .conftest import assert_unequal_prompts_batch_like_alone, generator, path_of, prompt

STEPS = 24
TOL = tolerance(dtypes.F16)
MODELS = ["llama_a", "mixtral_a", "qwen3_moe_a", "deepseek_v3_a", "deepseek_v4_a", "mixtral_b", "deepseek_v3_tiny"]
DEFAULT = [("llama_a", 7)]
SLOW = [("deepseek_v3_a", 7), ("deepseek_v4_a", 40), ("mixtral_b", 40), ("qwen3_moe_a", 1)]
FULL = [pytest.param(m, n, marks=pytest.mark.slow) for m, n in SLOW] + \
       [pytest.param(m, n, marks=pytest.mark.corpus) for m in MODELS for n in (1, 7, 40)
        if (m, n) not in DEFAULT + SLOW]


@functools.lru_cache(maxsize=None)
def artifact(name: str) -> str:
    from polyport.compiler import compile_model
    tmp = tempfile.mkdtemp(prefix=f"polyport_gen_ascend_{name}_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AscendFallbackWarning)      # MLA's fallbacks: checked below
        compile_model(path_of(name), ["ascend"], f"{tmp}/art")
    return f"{tmp}/art"


@functools.lru_cache(maxsize=None)
def session(name: str):
    return polyport.load(artifact(name), target="ascend")


def assert_close(got: np.ndarray, want: np.ndarray, where: str) -> None:
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= TOL, f"{where}: max diff {err:.3g} x max|logit| > {TOL}"


def routed_as_emulated(monkeypatch):
    """`reference(step)` runs a reference step with the experts the emulator chose since the last one (in
    `chunks` steps of its own: each MoE layer's choices concatenated)."""
    trace: list = []
    monkeypatch.setattr(ascend_emulator, "ROUTING_TRACE", trace)

    def reference(step, chunks: int = 1):
        layers = len(trace) // chunks
        forced = [np.concatenate(trace[i::layers]) for i in range(layers)]
        with monkeypatch.context() as m:
            m.setattr(moe_fused, "route", routing_as_emulated(iter(forced)))
            out = step()
        trace.clear()
        return out
    return reference


def teacher_forced(name: str, n: int, monkeypatch, steps: int = STEPS, s=None) -> None:
    """fp16 may flip a near-tied expert choice (a device would flip it too): each reference step runs with
    the experts the emulator chose in that step, weighed by its own fp32 scores (tests/targets/test_ascend.py)."""
    reference = routed_as_emulated(monkeypatch)
    ids = prompt(name, n, steps)
    g = (s or session(name)).start(ids[:, :n])
    assert g.cached, "the ascend session recomputes instead of decoding through its cache"
    want = reference(lambda: generator(name).start(ids[:, :n]))
    assert_close(g.logits, want.logits, f"{name} prefill of {n}")
    for t in range(steps):
        got = g.append(ids[:, n + t])
        assert_close(got, reference(lambda: want.append(ids[:, n + t])), f"{name} step {t} after {n}")
    assert int(g.length[0]) == n + steps


@pytest.mark.parametrize("name,n", DEFAULT + FULL)
def test_teacher_forced_decode_matches_the_reference_programs(name, n, monkeypatch):
    teacher_forced(name, n, monkeypatch)


def test_programs_are_atc_ready_onnx_carrying_paged_caches():
    art = artifact("llama_a")
    entry = json.loads(open(f"{art}/manifest.json").read())["targets"]["ascend"]
    assert entry["programs"] == ["prefill", "decode"]
    layout = entry["paged_cache"]
    assert layout["block_size"] % 16 == 0 and set(layout["groups"]) == {"linear"}
    caches = [c["name"] for c in layout["caches"]]
    for name in ("prefill", "decode"):
        model = onnx.load(f"{art}/ascend/{name}.onnx")
        onnx.checker.check_model(model, full_check=True)
        ins, outs = [v.name for v in model.graph.input], [v.name for v in model.graph.output]
        assert ins[:2] == ["input_ids", "lengths" if name == "prefill" else "past_len"]
        assert {"block_table.linear", "slot_mapping.linear"} <= set(ins) and ins[-len(caches):] == caches
        assert outs == ["logits"] + [f"{c}.out" for c in caches]
        assert all(n.op_type in (CANN_ONNX_OPS if n.domain == "" else CANN_OPS) for n in model.graph.node)
        calls = json.loads(open(f"{art}/ascend/{name}.op_plan.json").read())["calls"]
        assert [c["name"] for c in calls] == [n.name for n in model.graph.node]
        writes = [c for c in calls if c["op"] == "ScatterPaKvCache"]
        assert len(writes) == len(caches) // 2 and all(c["domain"] == CANN_DOMAIN for c in writes)
    fia = [c for c in calls if c["op"] == "FusedInferAttentionScore"]     # decode: over the paged caches
    assert fia and all(c["inputs"][7]["name"] == "block_table.linear" and c["inputs"][1]["name"].endswith(".out_bsh")
                       and c["inputs"][6]["name"] == "actual_seq_lengths_kv" and c["attributes"]["block_size"] ==
                       layout["block_size"] for c in fia)
    external = {}                                 # the three models' weights, stored once in weights.bin
    for stem in ("model", "prefill", "decode"):
        for t in onnx.load(f"{art}/ascend/{stem}.onnx", load_external_data=False).graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ref = {e.key: e.value for e in t.external_data}
                assert ref["location"] == "weights.bin"
                external[stem, t.name] = (int(ref["offset"]), int(ref["length"]))
    stored = set(external.values())
    assert sum(n for _, n in stored) <= os.path.getsize(f"{art}/ascend/weights.bin") < sum(
        n for _, n in external.values()) / 2
    assert "ascend/weights.bin" in json.loads(open(f"{art}/manifest.json").read())["files"]
    atc = open(f"{art}/ascend/atc.sh").read()
    assert "--model=decode.onnx" in atc and "--model=prefill.onnx" in atc
    assert "NOT compiled with atc" in atc


def test_the_caches_are_written_where_the_block_table_says():
    s = session("llama_a")
    cache = s.new_cache(1, 300)
    cache.tables["linear"][0] = cache.tables["linear"][0][::-1]          # the physical blocks in another order
    ids = prompt("llama_a", 5)
    s.run_program("prefill", {"input_ids": ids, "lengths": np.array([5])}, cache)
    k = cache.arrays["cache.0.k"]
    first = int(cache.tables["linear"][0, 0])
    assert np.abs(k[first, :5]).sum(axis=(-1, -2)).all() and not k[first, 5:].any()
    assert not np.delete(k, first, axis=0).any()                       # nothing else written (scratch included)
    want = generator("llama_a").start(ids)
    got = s.run_program("decode", {"input_ids": ids[:, :1], "past_len": np.array([5])}, cache)
    assert_close(got, want.append(ids[:, :1]), "decode through a permuted block table")
    assert not k[first, 5].any() and cache.arrays["cache.0.k"][first, 5].any()    # the step's row, in a new array


def test_cli_generate_decodes_on_the_emulator(cli):
    r = cli("generate", artifact("llama_a"), "--target", "ascend", "--prompt-ids", "5,17,42", "--max-new-tokens",
            "6", "--json")
    assert r.exit_code == 0, r.stderr
    assert "emulated on CPU (no Ascend device)" in r.stderr and "recomputes" not in r.stderr
    want = session("llama_a").generate(np.array([[5, 17, 42]]), 6)
    assert json.loads(r.stdout)["tokens"] == want.tolist()


def test_a_batch_of_unequal_prompts_equals_each_alone():
    assert_unequal_prompts_batch_like_alone(session("llama_a"), "llama_a")


@pytest.mark.slow
def test_a_sliding_window_layer_lives_in_a_ring_of_blocks(monkeypatch):
    s = session("mixtral_b")                                           # window 16 on every layer
    layout = s.entry["paged_cache"]
    assert set(layout["groups"]) == {"window16"} and layout["groups"]["window16"]["ring_blocks"] == 2
    g = s.start(prompt("mixtral_b", 3 * 16), max_length=4096)
    assert all(a.shape[0] == 2 + 1 for a in g._caches[0].arrays.values())    # the ring + scratch, not 4096 / 128
    # a prompt longer than the ring (its oldest rows go to the scratch block), then one append longer than
    # a step may write before it reads (ring slots - window + 1): the session runs it as several steps
    slack = g._caches[0].max_step
    assert slack == 2 * layout["block_size"] - 16 + 1
    reference = routed_as_emulated(monkeypatch)
    n = 2 * layout["block_size"] + 20
    ids = prompt("mixtral_b", n, slack + 19)
    g = s.start(ids[:, :n])
    want = reference(lambda: generator("mixtral_b").start(ids[:, :n]))
    assert_close(g.logits, want.logits, "a prompt longer than the ring")
    got = g.append(ids[:, n:])
    assert_close(got, reference(lambda: want.append(ids[:, n:]), chunks=2), f"{slack + 19} tokens appended at once")


@pytest.mark.slow
def test_mla_decodes_the_absorbed_latent_cache():
    s = session("deepseek_v3_a")
    entry = s.entry
    layer = s.generation["layers"][0]
    dc, dr = layer["v_head_dim"], layer["head_dim"] - layer["v_head_dim"]
    caches = {c["name"]: c["head_dim"] for c in entry["paged_cache"]["caches"]}
    assert caches == {f"cache.{i}.kv.{p}": d for i in range(len(s.generation["layers"]))
                      for p, d in (("nope", dc), ("rope", dr))}
    # the corpus' small latent takes FIA's fallback (one [latent ; rope] key); DeepSeek's 512 + 64 the MLA path
    assert any(f.get("program") == "decode" and "mla_dims" in f["limit"] for f in entry["fallbacks"])


@pytest.mark.slow
def test_mla_through_fia_query_rope_and_split_caches(tmp_path, monkeypatch):
    """FIA's MLA path (queryRope / keyRope over the .nope / .rope caches) is taken at DeepSeek's 512 + 64
    only; widened to deepseek_v3_a's small dims, its decode still matches the reference."""
    from polyport.compiler import compile_model
    layer = generator("deepseek_v3_a").generation["layers"][0]
    dims = (layer["v_head_dim"], layer["head_dim"] - layer["v_head_dim"])
    monkeypatch.setitem(L.LIMITS, L.FIA, [dataclasses.replace(lim, value=(dims,)) if lim.name == "mla_dims"
                                          else lim for lim in L.LIMITS[L.FIA]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AscendFallbackWarning)      # the main program's v padding
        art = compile_model(path_of("deepseek_v3_a"), ["ascend"], tmp_path / "art")
    plan = json.loads((art / "ascend" / "decode.op_plan.json").read_text())["calls"]
    fia = [c for c in plan if c["op"] == "FusedInferAttentionScore"]
    assert fia and all(len(c["inputs"]) == 10 and c["inputs"][9]["name"].endswith(".rope.out_bsh")
                       and c["aclnn"] == "aclnnFusedInferAttentionScoreV3" for c in fia)
    teacher_forced("deepseek_v3_a", 7, monkeypatch, steps=8, s=polyport.load(art, target="ascend"))


def test_fia_mla_path_equals_one_concatenated_key():
    """FIA's queryRope / keyRope (MLA at DeepSeek's sizes) scores q.k + q_rope.k_rope: the same as one key
    [latent ; rope] with the value the latent (the fallback the corpus takes)."""
    fia = next(op for op in ascend_emulator._ops() if op.__name__ == "FusedInferAttentionScore")
    rng = np.random.default_rng(0)
    nb, bs, dc, dr, h = 4, 16, 512, 64, 2
    nope, rope = (rng.standard_normal((nb, bs, d)).astype(np.float16) for d in (dc, dr))
    q = rng.standard_normal((1, h, 1, dc + dr)).astype(np.float16)
    table, lens = np.array([[2, 0, 3]], np.int32), np.array([40])
    run = functools.partial(fia._run, None, num_heads=h, num_key_value_heads=1, scale=0.05, block_size=bs)
    split = run(q[..., :dc], nope, nope, None, None, None, lens, table, q[..., dc:], rope)[0]
    both = np.concatenate([nope, rope], axis=-1)
    joined = run(q, both, both, None, None, None, lens, table)[0][..., :dc]
    np.testing.assert_allclose(split.astype(np.float32), joined.astype(np.float32), atol=2e-3)


def test_paged_limits_name_the_node_op_and_limit():
    with pytest.raises(LimitError, match=r"^node attn: CANN FusedInferAttentionScore requires kv_heads_ratio <= 64, "
                                         r"got 128 .*no fallback exists$"):
        check("attn", "FusedInferAttentionScore", {"kv_heads_ratio": 128}, [])
    with pytest.raises(LimitError, match=r"requires block_size a multiple of 16, got 24"):
        check("attn", "FusedInferAttentionScore", {"block_size": 24}, [])
    with pytest.raises(LimitError, match=r"^node w: CANN ScatterPaKvCache requires dtype one of .*got 'float32'"):
        check("w", "ScatterPaKvCache", {"dtype": "float32"}, [])


@pytest.mark.corpus
@pytest.mark.parametrize("name", sorted(corpus()) + ["deepseek_v3_tiny"])
def test_every_corpus_decode_plan_passes_the_limits(name):
    """Compiling lowers and checks every derived program node by node (a broken limit without a fallback
    raises LimitError); models whose attention cannot be cached have no programs and recompute."""
    s = session(name)
    cached = (not generator(name).generation["uncached"] and not generator(name).generation.get("compressed_decode")
              and not corpus().get(name, {}).get("hf_config", {}).get("attn_logit_softcapping"))  # FIA: no soft-cap
    assert ("programs" in s.entry) == cached
    if cached:
        plan = json.loads(open(f"{artifact(name)}/ascend/decode.op_plan.json").read())["calls"]
        fia = [c for c in plan if c["op"] == "FusedInferAttentionScore"]
        assert len(fia) == len(s.generation["layers"]) and all(c["inputs"][7]["name"].startswith("block_table.")
                                                                 for c in fia)

"""Generation on the cpu target: the derived prefill/decode built into model.so, against ORT's full forward.

Teacher forcing as in test_generate_reference.py, on a compiled cpu artifact: `g.append(token)`
one at a time reproduces ORT's logits at each position within 1e-4 x max|logit|. Also: the
library holds main, prefill and decode (model.json "functions"), the caches are device buffers
updated in place (the same memory before and after a step), a batch of unequal prompts equals
each alone, a sliding-window layer's ring keeps `window` slots. Default run: llama_a (one
compile); these models x prompt lengths 1, 7, 40 are slow, the rest of the corpus `corpus` (one cpu
build each: run by hand, `pytest -m corpus tests/generation/test_generate_cpu.py`)."""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile

import numpy as np
import pytest

import polyport
from polyport.tests.real_models import assert_logits_close, corpus

from .conftest import (assert_decodes_like, assert_unequal_prompts_batch_like_alone, ort_logits, path_of, prompt,
                       quantized_graph)

STEPS = 24
MODELS = ["llama_a", "mixtral_a", "qwen3_moe_a", "deepseek_v3_a", "deepseek_v4_a", "deepseek_v3_tiny", "gemma2_a",
          "deepseek_v4_b"]                                         # v4_b: CSA + HCA caches (deepseek_v4_d: corpus)
DEFAULT = [("llama_a", 7)]
FULL = [pytest.param(m, n, marks=pytest.mark.slow) for m in MODELS for n in (1, 7, 40) if (m, n) not in DEFAULT]
REST = [pytest.param(m, n, marks=pytest.mark.corpus) for m in sorted(corpus()) if m not in MODELS for n in (1, 7, 40)]


@functools.lru_cache(maxsize=None)
def artifact(name: str) -> str:
    from polyport.compiler import compile_model
    tmp = tempfile.mkdtemp(prefix=f"polyport_gen_cpu_{name}_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    out = f"{tmp}/art"
    compile_model(path_of(name), ["cpu"], out)
    return out


@functools.lru_cache(maxsize=None)
def session(name: str):
    return polyport.load(artifact(name), target="cpu")


def teacher_forced(name: str, n: int, steps: int = STEPS) -> None:
    ids = prompt(name, n, steps)
    want = ort_logits(name, ids)[0]
    g = session(name).start(ids[:, :n])
    assert_logits_close(g.logits[0], want[n - 1])
    for t in range(steps):
        got = g.append(ids[:, n + t])
        if t + 1 < steps:
            assert_logits_close(got[0], want[n + t])
    assert int(g.length[0]) == n + steps


@pytest.mark.parametrize("name,n", DEFAULT + FULL + REST)
def test_teacher_forced_decode_matches_ort_full_forward(name, n):
    teacher_forced(name, n)


def test_the_library_holds_main_prefill_and_decode():
    art = artifact("llama_a")
    meta = json.loads(open(f"{art}/cpu/model.json").read())
    assert set(meta["functions"]) == {"prefill", "decode"}
    decode = meta["functions"]["decode"]
    assert decode["inputs"][:2] == ["input_ids", "past_len"]
    assert decode["outputs"][1:] == [f"{t}.out" for t in decode["inputs"][2:]]
    manifest = json.loads(open(f"{art}/manifest.json").read())
    assert manifest["targets"]["cpu"]["programs"] == ["prefill", "decode"]
    assert session("llama_a").generation["layers"]


def _address(tensor) -> int:
    return np.from_dlpack(tensor).__array_interface__["data"][0]   # a view of the device (host) buffer


def test_decode_updates_the_cache_buffers_in_place():
    s = session("llama_a")
    ids = prompt("llama_a", 5)
    cache = s.new_cache(1, 16)
    before = {n: _address(t) for n, t in cache.items()}
    s.run_program("prefill", {"input_ids": ids, "lengths": np.array([5])}, cache)
    s.run_program("decode", {"input_ids": ids[:, :1], "past_len": np.array([5])}, cache)
    assert {n: _address(t) for n, t in cache.items()} == before
    k = np.from_dlpack(cache["cache.0.k"])
    assert np.abs(k[0, :, :6]).sum(axis=-1).all()   # the 5 prompt positions and the decoded one
    assert not k[0, :, 6:].any()                    # nothing written past the 6 real positions


@pytest.mark.parametrize("name", ["llama_a", pytest.param("mixtral_b", marks=pytest.mark.slow)])
def test_a_batch_of_unequal_prompts_equals_each_alone(name):
    assert_unequal_prompts_batch_like_alone(session(name), name)


@pytest.mark.slow
def test_a_sliding_window_layer_runs_in_a_ring_of_window_slots():
    s = session("mixtral_b")                              # window 16 on every layer
    layers = s.generation["layers"]
    assert {layer["capacity"] for layer in layers} == {16}
    teacher_forced("mixtral_b", 40)                       # 40 + 24 tokens: the ring wraps four times
    g = s.start(prompt("mixtral_b", 3 * 16), max_length=1024)
    assert all(t.shape[2] == 16 for t in g._caches[0].values())


@pytest.mark.slow
def test_several_tokens_per_step_over_a_ring():
    """k > 1 new rows over a ring: each step's update (in place) runs after its attention read the ring."""
    ids = prompt("mixtral_b", 20, 12)
    want = ort_logits("mixtral_b", ids)[0]
    g = session("mixtral_b").start(ids[:, :20])
    for t in range(20, 32, 4):
        assert_logits_close(g.append(ids[:, t:t + 4])[0], want[t + 3])


@pytest.mark.slow
def test_mla_over_int8_weights_decodes_absorbed(tmp_path):
    """deepseek_v3_a compiled with --quantize int8 (embeddings too): the cache still holds the latent and the
    rope key only, and teacher-forced decode equals the reference's full forward over the same quantized graph."""
    from polyport.compiler import compile_model
    from polyport.passes.quantize_weights import WeightQuantization
    from polyport.runtime.reference import ReferenceSession
    name, n, steps, spec = "deepseek_v3_a", 7, 8, WeightQuantization("int8", 32, embeddings=True)
    cfg = corpus()[name]["hf_config"]
    s = polyport.load(compile_model(path_of(name), ["cpu"], tmp_path / "art", quantization=spec), target="cpu")
    layers = s.generation["layers"]
    assert [layer["kind"] for layer in layers] == ["mla"] * cfg["num_hidden_layers"]
    assert {layer["bytes_per_token"] for layer in layers} == {(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4}
    g = quantized_graph(name, spec)
    ids = prompt(name, n, steps)
    assert_decodes_like(s, ids, n, ReferenceSession(g).run({g.inputs[0].name: ids})[g.outputs[0].name][0])

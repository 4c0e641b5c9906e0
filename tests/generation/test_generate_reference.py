"""Generation on the reference executor over the derived programs, against ONNX Runtime's full forward.

Teacher forcing is exact: ORT's cache-less forward over prompt + tokens gives
every position's logits; `g.append(token)` one at a time must reproduce each
row within 1e-4 x max|logit| (fp32). Default run: one model per cache layout
at the length that exercises it; the full corpus x lengths 1, 7, 40 is slow."""
from __future__ import annotations

import numpy as np
import pytest

from polyport.tests.real_models import assert_logits_close, corpus

from .conftest import (assert_decodes_like, assert_unequal_prompts_batch_like_alone, generator, ort_logits, prompt,
                       quantized_graph)

STEPS = 24
ALL_MODELS = sorted(corpus()) + ["deepseek_v3_tiny"]
# mha, window, shared K=V + sinks, MLA, soft-capped scores over a ring, CSA + HCA
DEFAULT = [("llama_a", 7), ("mixtral_b", 40), ("deepseek_v4_a", 40), ("deepseek_v3_tiny", 1), ("gemma2_a", 40),
           ("deepseek_v4_b", 7)]
FULL = [pytest.param(m, n, marks=pytest.mark.slow) for m in ALL_MODELS for n in (1, 7, 40) if (m, n) not in DEFAULT]


def teacher_forced(name: str, n: int, steps: int = STEPS) -> None:
    ids = prompt(name, n, steps)
    want = ort_logits(name, ids)[0]
    g = generator(name).start(ids[:, :n])
    assert_logits_close(g.logits[0], want[n - 1])
    for t in range(steps):
        got = g.append(ids[:, n + t])                       # [batch] form: one token per sequence
        assert_logits_close(got[0], want[n + t])
    assert int(g.length[0]) == n + steps


@pytest.mark.parametrize("name,n", DEFAULT + FULL)
def test_teacher_forced_decode_matches_ort_full_forward(name, n):
    teacher_forced(name, n)


def ort_greedy(name: str, ids: np.ndarray, steps: int) -> tuple[list[int], list[float]]:
    seq, tokens, margins = ids.copy(), [], []
    for _ in range(steps):
        last = ort_logits(name, seq)[0, -1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tokens.append(int(np.argmax(last)))
        seq = np.concatenate([seq, [[tokens[-1]]]], axis=1)
    return tokens, margins


@pytest.mark.parametrize("name", ["llama_a", pytest.param("deepseek_v4_c", marks=pytest.mark.slow),
                                  pytest.param("deepseek_v3_tiny", marks=pytest.mark.slow)])
def test_greedy_generate_equals_the_ort_greedy_loop(name):
    ids = prompt(name, 7)
    got = generator(name).generate(ids, STEPS)
    want, margins = ort_greedy(name, ids, STEPS)
    assert got.dtype == np.int64 and got.shape == (1, STEPS)
    for t, (a, b) in enumerate(zip(got[0].tolist(), want)):
        if a != b:                       # allowed only after a near-tie; report where
            assert min(margins[:t + 1]) < 1e-5, f"step {t}: {a} != {b} with top-1/top-2 margins {margins[:t + 1]}"
            break


@pytest.mark.parametrize("name", ["llama_a", pytest.param("mixtral_b", marks=pytest.mark.slow),
                                  pytest.param("deepseek_v4_b", marks=pytest.mark.slow)])
def test_a_batch_of_unequal_prompts_equals_each_alone(name):
    s = generator(name)
    lengths = [3, 9, 17]
    ids, alone = assert_unequal_prompts_batch_like_alone(s, name, lengths)
    mask = (np.arange(17)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    np.testing.assert_array_equal(s.generate(ids, 6, attention_mask=mask), alone)


def test_batch_one_exports_get_batch_generic_programs():
    """The corpus fixes batch at 1; the derived programs take a symbolic batch (one prefill and one decode
    call per step for the whole batch: the unequal-prompt check above runs that path)."""
    s = generator("llama_a")
    assert s.generation["batch"] is None and "per_sequence" not in s.generation
    for program in (s._programs["prefill"].graph, s._programs["decode"].graph):
        assert all(str(v.shape[0]) == "batch" for v in [*program.inputs, *program.outputs])


def test_programs_that_cannot_be_batched_run_one_sequence_per_cache(monkeypatch):
    """Where the batch cannot be told, the batch-1 programs stay, the manifest says why, and a batch still
    equals each sequence alone (one cache per sequence)."""
    import polyport.passes.derive_generation as derive
    from polyport.compiler import reference_generator
    from .conftest import path_of
    monkeypatch.setattr(derive, "make_batch_generic", lambda program: "node X drops the batch dim")
    s = reference_generator(path_of("llama_a"))
    assert s.generation["batch"] == 1 and s.generation["per_sequence"] == "node X drops the batch dim"
    assert_unequal_prompts_batch_like_alone(s, "llama_a", steps=3)


def test_append_takes_several_tokens_at_once():
    name, n = "llama_a", 7
    ids = prompt(name, n, 5)
    g = generator(name).start(ids[:, :n])
    got = g.append(ids[:, n:])                              # [batch, k]
    assert_logits_close(got[0], ort_logits(name, ids)[0, -1])


def test_a_sliding_window_layer_holds_window_positions_after_3x_window_tokens():
    s = generator("mixtral_b")                              # window 16 on every layer
    window = 16
    layers = s.generation["layers"]
    assert {layer["kind"] for layer in layers} == {"window"} and {layer["capacity"] for layer in layers} == {window}
    g = s.start(prompt("mixtral_b", 1), max_length=1024)
    for t in range(3 * window):
        g.append(np.array([t % 50]))
    cache = g._caches[0]
    assert all(a.shape[2] == window for a in cache.values())
    assert g.reserved_bytes == sum(layer["bytes_per_token"] * window for layer in layers)


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    s = generator("llama_a")
    ids = prompt("llama_a", 5)
    a = s.generate(ids, 8, temperature=0.8, top_k=5, seed=7)
    np.testing.assert_array_equal(a, s.generate(ids, 8, temperature=0.8, top_k=5, seed=7))
    g = s.start(ids)
    allowed = set(np.argsort(-g.logits[0])[:1].tolist())
    assert int(s.generate(ids, 1, temperature=1.0, top_k=1, seed=3)[0, 0]) in allowed


def test_stop_tokens_end_generation_and_on_token_streams():
    s = generator("llama_a")
    ids = prompt("llama_a", 5)
    full = s.generate(ids, 10)
    stop = int(full[0, 3])
    seen = []
    out = s.generate(ids, 10, stop_tokens=(stop,), on_token=seen.append)
    first = int(np.argmax(full[0] == stop))
    np.testing.assert_array_equal(out[0], full[0, :first + 1])
    assert [int(t[0]) for t in seen] == out[0].tolist()


def test_an_interrupted_generation_leaves_the_session_usable():
    s = generator("llama_a")
    ids = prompt("llama_a", 5)
    want = s.generate(ids, 6)

    def interrupt(tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.generate(ids, 6, on_token=interrupt)
    np.testing.assert_array_equal(s.generate(ids, 6), want)


def test_states_in_flight_own_their_caches():
    s = generator("llama_a")
    a_ids, b_ids = prompt("llama_a", 4, 1), prompt("llama_a", 9, 1)
    a, b = s.start(a_ids[:, :4]), s.start(b_ids[:, :9])
    la, lb = a.append(a_ids[:, 4]), b.append(b_ids[:, 9])
    assert_logits_close(la[0], ort_logits("llama_a", a_ids)[0, -1])
    assert_logits_close(lb[0], ort_logits("llama_a", b_ids)[0, -1])


def test_an_uncached_layer_recomputes_with_one_warning(capfd):
    s = generator("deepseek_v2_a")          # complex RoPE left unfused: its positions cannot move, uncached
    assert s.generation["uncached"] and not s.generation["layers"]
    s._warned_recompute = False                             # the warning comes once per session
    ids = prompt("deepseek_v2_a", 5, 3)
    g = s.start(ids[:, :5])
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recomputes the whole sequence" in err[0] and s.generation["uncached"][0] in err[0]
    for t in range(3):
        got = g.append(ids[:, 5 + t])
    assert_logits_close(got[0], ort_logits("deepseek_v2_a", ids)[0, -1])


def test_compressed_layers_cache_entries_and_a_bounded_tail():
    """DeepSeek V4's CSA / HCA layers: window keys in a ring, one entry (CSA: plus one indexer key) per `rate`
    tokens up to max_length, the raw kv / gate tail in rings of rate x (1 + overlap) rows. The manifest states
    each layer's bytes per token (its entries) and its fixed ring bytes; a [batch, k] append is split into
    single-token decode steps and still matches ORT."""
    name = "deepseek_v4_b"
    cfg = corpus()[name]["hf_config"]
    s = generator(name)
    info = s.generation
    assert info["decode_step"] == 1 and info["batch"] == 1 and "ascend recomputes" in info["compressed_decode"]
    layers = info["layers"]
    kinds = {"heavily_compressed_attention": "hca", "compressed_sparse_attention": "csa",
             "sliding_attention": "shared_kv"}
    assert [layer["kind"] for layer in layers] == [kinds[t] for t in cfg["layer_types"]]
    d, dq, window = cfg["head_dim"], cfg["index_head_dim"], cfg["sliding_window"]
    for layer in layers:
        if layer["kind"] == "shared_kv":
            continue
        csa = layer["kind"] == "csa"
        rate = cfg["compress_rates"]["compressed_sparse_attention" if csa else "heavily_compressed_attention"]
        name_ = layer["name"]
        want = {f"{name_}.kv": [1, window, d], f"{name_}.entries": [1, f"max_length/{rate}", d]}
        if csa:                                  # overlapping windows: 2 x rate raw rows of 2 x D channels
            want.update({f"{name_}.index": [1, f"max_length/{rate}", dq],
                         f"{name_}.kv_raw": [1, 2 * rate, 2 * d], f"{name_}.gate_raw": [1, 2 * rate, 2 * d],
                         f"{name_}.index_kv_raw": [1, 2 * rate, 2 * dq],
                         f"{name_}.index_gate_raw": [1, 2 * rate, 2 * dq]})
        else:
            want.update({f"{name_}.kv_raw": [1, rate, d], f"{name_}.gate_raw": [1, rate, d]})
        assert layer["shapes"] == want and layer["rate"] == rate and layer["capacity"] == window
        assert layer["bytes_per_token"] == (d + (dq if csa else 0)) * 4 // rate
        assert layer["fixed_bytes"] == sum(h * n * c * 4 for h, n, c in want.values() if isinstance(n, int))
    ids = prompt(name, 3, 3 * window + 6)
    g = s.start(ids[:, :3], max_length=64)
    got = g.append(ids[:, 3:3 + 3 * window])                 # split into single steps
    want = ort_logits(name, ids[:, :3 + 3 * window])[0, -1]
    assert_logits_close(got[0], want)
    cache = g._caches[0]
    for layer in layers:
        for tensor, (heads, slots, dim) in (layer.get("shapes") or {}).items():
            rows = slots if isinstance(slots, int) else -(-64 // layer["rate"])
            assert cache[tensor].shape == (1, heads, rows, dim)
    assert g.reserved_bytes == sum(a.nbytes for a in cache.values())


def test_positions_outside_a_fused_rotary_are_not_cached():
    """DeepSeek-V2's complex RoPE stays unfused: its arange over the sequence cannot become
    past_len + arange(step), so the model is uncached (recomputes) instead of decoding wrong positions."""
    s = generator("deepseek_v2_a")
    assert not s.generation["layers"] and any("arange" in n for n in s.generation["uncached"])


@pytest.mark.parametrize("call,match", [
    (lambda s: s.generate(np.array([[1, 999]]), 2), r"token id 999 is outside \[0, 256\)"),
    (lambda s: s.generate(np.zeros((1, 0), np.int64), 2), "empty prompt"),
    (lambda s: s.generate(np.array([[1, 2]]), -1), "max_new_tokens must be an integer >= 0"),
    (lambda s: s.generate(np.array([[1, 2]]), 5, max_length=4), "past max_length 4"),
    (lambda s: s.generate(np.array([[1, 2], [3, 4]]), 2, lengths=[2, 3]), "lengths .* disagree"),
    (lambda s: s.generate(np.array([[1, 2], [3, 4]]), 2, lengths=[2]), "lengths must be 2 integers"),
    (lambda s: s.start(np.array([[1, 2]]), max_length=3).append(np.array([[1, 2]])), "past max_length 3"),
    (lambda s: s.start(np.array([[1, 2]])).append(np.array([1.5])), "append takes int64 token ids"),
    (lambda s: s.generate(np.array([[1, 2]]), 2, temperature=-1.0), "temperature must be >= 0"),
    (lambda s: s.generate(np.array([[1, 2]]), 2, temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_input_is_one_line_polyport_error(call, match):
    from polyport import errors
    with pytest.raises(errors.PolyportError, match=match) as e:
        call(generator("llama_a"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["deepseek_v3_a", "deepseek_v3_b"])
def test_deepseek_v3_caches_the_latent_and_rope_key_only(name):
    cfg = corpus()[name]["hf_config"]
    layers = generator(name).generation["layers"]
    per_token = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    assert len(layers) == cfg["num_hidden_layers"]
    for layer in layers:
        assert layer["kind"] == "mla" and layer["tensors"] == [f"{layer['name']}.kv"]
        assert layer["bytes_per_token"] == per_token
        naive = cfg["num_attention_heads"] * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"]) * 4
        assert layer["naive_ratio"] == round(naive / per_token, 3)


@pytest.mark.parametrize("scheme", ["int8", pytest.param("bf16", marks=pytest.mark.slow)])
def test_mla_stays_absorbed_over_quantized_weights(scheme):
    """`--quantize` / `--dtype` turn the MLA up-projection into a QuantMatMul: the absorbed layout still
    holds (W_uk / W_uv from the dequantized weights), and teacher-forced decode equals the reference's
    full forward over the same quantized graph."""
    from polyport.passes.derive_generation import derive_generation, generation_entry
    from polyport.passes.quantize_weights import WeightQuantization
    from polyport.runtime.reference import ReferenceGenerator, ReferenceSession
    name, n, steps = "deepseek_v3_a", 7, 6
    cfg = corpus()[name]["hf_config"]
    g = quantized_graph(name, WeightQuantization(scheme, 32))
    programs = derive_generation(g)
    assert [layer.kind for layer in programs.layers] == ["mla"] * cfg["num_hidden_layers"]
    assert {layer.bytes_per_token for layer in programs.layers} == {(cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4}
    s = ReferenceGenerator(g, programs, generation_entry(g, programs))
    ids = prompt(name, n, steps)
    assert_decodes_like(s, ids, n, ReferenceSession(g).run({g.inputs[0].name: ids})[g.outputs[0].name][0])

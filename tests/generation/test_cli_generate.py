"""`polyport generate` and `compile --tokenizer`: output forms and every bad input (one line, exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from polyport.tests.real_models import MODELS

from .conftest import generator

LLAMA = MODELS / "llama_a.onnx"       # vocab 256


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer_file):
    """llama_a for the ascend target (its CPU emulator decodes through the paged-cache programs)."""
    from click.testing import CliRunner

    from polyport.cli import main
    out = tmp_path_factory.mktemp("art") / "llama"
    r = CliRunner().invoke(main, ["compile", str(LLAMA), "-t", "ascend", "-o", str(out),
                                  "--tokenizer", str(tokenizer_file)])
    assert r.exit_code == 0, r.output
    return out


def test_generate_json_equals_the_api_on_the_reference_executor(cli):
    r = cli("generate", LLAMA, "--prompt-ids", "5,17,42", "--max-new-tokens", "6", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    want = generator("llama_a").generate(np.array([[5, 17, 42]]), 6)
    assert out["tokens"] == want.tolist() and out["ttft_ms"] > 0 and out["tpot_ms"] > 0


def test_generate_streams_tokens_then_timings(cli):
    r = cli("generate", LLAMA, "--prompt-ids", "5,17,42", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.stderr
    tokens, timing = r.stdout.strip().splitlines()
    assert tokens.split() == [str(t) for t in generator("llama_a").generate(np.array([[5, 17, 42]]), 4)[0]]
    assert timing.startswith("time to first token") and "tokens/s" in timing


def test_generate_a_batch_from_input_ids_with_lengths(cli, tmp_path):
    ids = np.array([[5, 17, 42, 0], [7, 8, 9, 10]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    r = cli("generate", LLAMA, "--input-ids", tmp_path / "ids.npy", "--lengths", "3,4", "--max-new-tokens", "3",
            "--json")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)["tokens"]
    s = generator("llama_a")
    assert got == [s.generate(ids[:1, :3], 3)[0].tolist(), s.generate(ids[1:], 3)[0].tolist()]


def test_an_artifact_with_a_tokenizer_takes_a_text_prompt(cli, artifact):
    r = cli("generate", artifact, "--target", "ascend", "--prompt", "w5 w17 w42", "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.stderr
    want = generator("llama_a").generate(np.array([[5, 17, 42]]), 3)
    assert json.loads(r.stdout)["tokens"] == want.tolist()
    assert "recomputes" not in r.stderr and "emulated on CPU" in r.stderr   # decoded through the cache
    text = cli("generate", artifact, "--target", "ascend", "--prompt", "w5 w17 w42", "--max-new-tokens", "3")
    assert text.stdout.splitlines()[0].strip() == " ".join(f"w{t}" for t in want[0])


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", "5,999", "--max-new-tokens", "2"], r"token id 999 is outside [0, 256)"),
    (["--prompt-ids", "", "--max-new-tokens", "2"], "empty prompt"),
    (["--prompt-ids", "5,x", "--max-new-tokens", "2"], "--prompt-ids '5,x' is not a comma-separated list"),
    (["--prompt-ids", "5,6", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--prompt-ids", "5,6", "--max-new-tokens", "5000"], "past max_length 4096"),
    (["--prompt-ids", "5,6", "--lengths", "3", "--max-new-tokens", "2"], "lengths [3] disagree"),
    (["--prompt-ids", "5,6", "--prompt", "hi", "--max-new-tokens", "2"], "exactly one of"),
    (["--prompt", "hi", "--max-new-tokens", "2"], "needs a tokenizer"),
    (["--prompt-ids", "5", "--target", "cpu", "--max-new-tokens", "2"], "--target applies to a compiled artifact"),
])
def test_bad_input_is_one_line_exit_2(cli, args, message):
    r = cli("generate", LLAMA, *args)
    assert r.exit_code == 2
    assert r.stderr.startswith("polyport: error:") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_an_unknown_target_and_a_bad_tokenizer_are_one_line_errors(cli, artifact, tmp_path):
    r = cli("generate", artifact, "--target", "tpu", "--prompt-ids", "5", "--max-new-tokens", "2")
    assert r.exit_code == 2 and "unknown target 'tpu'" in r.stderr and r.stderr.count("\n") == 1
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    out = tmp_path / "art"
    r = cli("compile", LLAMA, "-t", "ascend", "-o", out, "--tokenizer", bad)
    assert r.exit_code == 2 and "--tokenizer" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()                                               # nothing written


def test_inspect_generate_prints_the_programs_and_the_cache_layout(cli):
    r = cli("inspect", MODELS / "mixtral_b.onnx", "--passes", "generate")
    assert r.exit_code == 0, r.stderr
    assert "graph prefill(" in r.stdout and "graph decode(" in r.stdout and "polyport::CachedAttention" in r.stdout
    assert "window, 2 kv heads x 8+8 f32, ring of 16 positions: 128 B/token" in r.stdout
    r = cli("inspect", MODELS / "mixtral_b.onnx", "--passes", "generate", "--json")
    layers = json.loads(r.stdout)["generation"]["layers"]
    assert [layer["bytes_per_token"] for layer in layers] == [128, 128]


def test_bench_decode_estimates_weights_read_once_plus_the_cache(cli, artifact, tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", artifact, "--decode", "--context", "16", "--context", "64", "--target", "ascend",
            "--json", out)
    assert r.exit_code == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(row["seq"], row["phase"], row["kind"]) for row in rows} == {
        (16, "ttft", "estimated"), (16, "tpot", "estimated"), (64, "ttft", "estimated"), (64, "tpot", "estimated")}
    tpot = {row["seq"]: row["bytes"] for row in rows if row["phase"] == "tpot"}
    assert tpot[64] - tpot[16] == 48 * 512              # llama_a: 2 layers x 256 B of K/V per token
    assert "16 ttft" in r.stdout and "64 tpot" in r.stdout
    r = cli("bench", artifact, "--context", "16")
    assert r.exit_code == 2 and "--context goes with --decode" in r.stderr


def test_bench_decode_estimates_every_absent_device(cli, artifact, tmp_path):
    """Without --target: ttft and tpot rows for H100 and H200 (cuda), MI300X (rocm) and 910B3 (ascend). A decode
    step reads the same bytes on each (active weights once + the cache); each device's bandwidth sets its time."""
    from polyport.devices import DEVICES
    out = tmp_path / "bench.json"
    r = cli("bench", artifact, "--decode", "--context", "1024", "--json", out)
    assert r.exit_code == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    tpot = {row["device"]: row for row in rows if row["phase"] == "tpot"}
    assert set(tpot) == {"NVIDIA H100 SXM", "NVIDIA H200 SXM", "AMD Instinct MI300X", "Huawei Ascend 910B3"}
    assert {row["kind"] for row in rows} == {"estimated"} and len(rows) == 8
    assert len({row["bytes"] for row in tpot.values()}) == 1
    bandwidth = {spec.name: spec.memory_bandwidth for spec in DEVICES.values()}
    for name, row in tpot.items():
        assert row["bound"] == "memory"
        assert row["median_ms"] == pytest.approx(row["bytes"] / bandwidth[name] * 1e3)
    assert tpot["NVIDIA H200 SXM"]["median_ms"] < tpot["NVIDIA H100 SXM"]["median_ms"]


def test_compile_names_the_layers_it_cannot_cache_and_the_manifest_records_them(cli, tmp_path):
    out = tmp_path / "v2a"
    r = cli("compile", MODELS / "deepseek_v2_a.onnx", "-t", "ascend", "-o", out)   # complex RoPE unfused: uncached
    assert r.exit_code == 0, r.stderr
    uncached = json.loads((out / "manifest.json").read_text())["generation"]["uncached"]
    assert uncached and all(f"generation: {name} cannot be cached" in r.stderr for name in uncached)


def test_a_target_without_compressed_decode_says_so_and_recomputes(cli, tmp_path):
    """deepseek_v4_b's CSA/HCA caches are in the manifest; ascend builds no programs for them, compile says so
    and generate recomputes with one warning naming why."""
    out = tmp_path / "v4b"
    r = cli("compile", MODELS / "deepseek_v4_b.onnx", "-t", "ascend", "-o", out)
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert [layer["kind"] for layer in m["generation"]["layers"]] == ["hca", "csa", "shared_kv"]
    assert "programs" not in m["targets"]["ascend"] and "generation: ascend: compressed layers" in r.stderr
    r = cli("inspect", MODELS / "deepseek_v4_b.onnx", "--passes", "generate")
    assert r.exit_code == 0, r.stderr
    assert "hca, shared K=V 32 f32, window ring of 16 + one entry per 8 tokens" in r.stdout
    assert "one entry per 4 tokens" in r.stdout and "48 B/token + 8192 B of rings" in r.stdout    # csa: + indexer keys
    r = cli("generate", out, "-t", "ascend", "--prompt-ids", "5,17,42", "--max-new-tokens", "2", "--json")
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "compressed layers (CSA/HCA)" in warnings[0], r.stderr


def test_compile_no_generation_records_recompute_and_generate_warns_once(cli, tmp_path):
    """`compile --no-generation`: no programs in the target entry, the manifest says generation recomputes,
    and generate warns once (the ascend emulator's recompute path: no TVM build)."""
    out = tmp_path / "art"
    r = cli("compile", LLAMA, "-t", "ascend", "-o", out, "--no-generation")
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert "programs" not in m["targets"]["ascend"] and not m["generation"]["layers"]
    assert m["generation"]["recompute"].endswith("(compile --no-generation)")
    r = cli("generate", out, "-t", "ascend", "--prompt-ids", "5,17,42", "--max-new-tokens", "3", "--json")
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--no-generation" in warnings[0], r.stderr
    assert len(json.loads(r.stdout)["tokens"][0]) == 3

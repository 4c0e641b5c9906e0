"""benchmarks/llama_cpp.py: quantized schemes and batched decode, on tiny models (llama.cpp only where
libllama is already built: building it takes many minutes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import engines  # noqa: E402
import llama_cpp  # noqa: E402

LLAMA = ROOT / "examples" / "models" / "llama_a.onnx"
LIBLLAMA = llama_cpp.CACHE / "build" / "bin" / "libllama.so"
needs_libllama = pytest.mark.skipif(not LIBLLAMA.exists(), reason=f"libllama is not built in {LIBLLAMA.parent} "
                                    "(python benchmarks/llama_cpp.py --build-only: many minutes)")


def test_each_scheme_has_its_own_cached_artifact(tmp_path, monkeypatch):
    import polyport.compiler
    built = []

    def fake_compile(onnx, targets, out, quantization=None, **kw):
        built.append((Path(out).name, quantization and quantization.scheme))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "manifest.json").write_text("{}")
    monkeypatch.setattr(polyport.compiler, "compile_model", fake_compile)
    arts = {s: engines.compile_cached(LLAMA, tmp_path, lambda m: None, quantization=llama_cpp.quantization(s))
            for s in ("f32", "int8", "int4", "int4", "f32")}
    assert built == [("llama_a", None), ("llama_a.int8", "int8"), ("llama_a.int4", "int4")]     # then cached
    assert len(set(arts.values())) == 3
    q = llama_cpp.quantization("int4")
    assert (q.scheme, q.group_size, q.lm_head, q.embeddings) == ("int4", 32, True, True)  # Q4_0's: LM head, table
    stamp = (tmp_path / "artifacts" / "llama_a.int4.source").read_text()
    (tmp_path / "artifacts" / "llama_a.int4.source").write_text(stamp.replace("group 32", "group 64"))
    engines.compile_cached(LLAMA, tmp_path, lambda m: None, quantization=q)
    assert built[-1] == ("llama_a.int4", "int4")           # another group size is another build


def _row(batch, polyport_ms, llama_ms):
    s = lambda v: {"median": v, "min": v, "max": v, "n": 1}   # noqa: E731
    return {"model": "m", "scheme": "int4", "gguf": "q4_0", "batch": batch, "context": 128, "polyport": s(polyport_ms),
            "llama.cpp": s(llama_ms), "polyport_tok_s": s(batch * 1e3 / polyport_ms),
            "llama.cpp_tok_s": s(batch * 1e3 / llama_ms), "ratio": s(llama_ms / polyport_ms),
            "roofline_fraction": s(0.5), "llama_cpp_roofline_fraction": s(0.4), "gbps": s(20.0), "load_avg": s(1.0)}


def test_the_table_gives_batch_scaling_per_engine_and_weight_bytes():
    sizes = [{"model": "m", "scheme": "int4", "gguf": "q4_0", "artifact_weights": 3e6, "token_reads": 2e6,
              "gguf_tensors": 2.5e6}]
    eight = _row(8, 16.0, 40.0) | {"scaling_ceiling": 6.5}
    text = llama_cpp.markdown([_row(1, 10.0, 20.0), eight], sizes, [], 2)
    one, eight = [line for line in text.splitlines() if line.startswith("| m |")][:2]
    assert "| int4 (Q4_0) | 1 | 128 |" in one and one.split(" | ")[9] == "–"
    # 8 x 1000/16 over 1000/10; 8 x 1000/40 over 1000/20; then what the bytes allow
    assert eight.split(" | ")[9] == "5.00x / 4.00x (ceiling 6.50x)"
    assert "| m | int4 (Q4_0) | 3 | 2 | 2.5 |" in text


@pytest.mark.slow
def test_polyport_child_decodes_int4_weights_eight_sequences_a_step(tmp_path):
    art = engines.compile_cached(LLAMA, tmp_path, lambda m: None, quantization=llama_cpp.quantization("int4"))
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "int4" and manifest["quantization"]["lm_head"]
    times = llama_cpp.polyport_decode(LLAMA, art, 16, 3, 1, batch=8)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(llama_cpp.polyport_prompt(LLAMA, art, 24, 2, 1)) == 2


@pytest.mark.slow
@needs_libllama
def test_llama_cpp_q4_0_decodes_eight_copied_sequences_as_each_alone(tmp_path):
    """Sequence i of a batch-8 step (the prompt copied from sequence 0) gives the logits a single sequence
    of the same prompt and token gives: each sequence has its own cache, and the copy is whole."""
    import big_model
    bin_dir = llama_cpp.build()
    big_model.export_big(tmp_path, lambda m: None, "llama_tiny")
    gguf = llama_cpp.convert(tmp_path / "llama_tiny.hf", "q4_0", bin_dir)
    tensors = llama_cpp.gguf_tensors(gguf)
    assert tensors["output.weight"][0] == "Q4_0" and tensors["blk.0.ffn_up.weight"][0] == "Q4_0"
    rng = np.random.default_rng(1)
    prompt, nxt = rng.integers(0, 500, 12), rng.integers(0, 500, 8)
    engine = llama_cpp.LlamaCpp(gguf, bin_dir, 32, 1, seqs=8)
    engine.decode(prompt, 0)
    for seq in range(1, 8):
        engine.copy_sequence(0, seq)
    batched = engine.step(nxt, len(prompt))
    engine.close()
    for i in (0, 5, 7):
        alone = llama_cpp.LlamaCpp(gguf, bin_dir, 32, 1)
        alone.decode(prompt, 0)
        want = alone.step(nxt[i:i + 1], len(prompt))[0]
        alone.close()
        assert np.abs(batched[i] - want).max() <= 1e-3 * np.abs(want).max()
    assert len(llama_cpp.llama_cpp_decode(gguf, bin_dir, 16, 3, 1, batch=8)) == 3


def test_the_table_gives_prompt_processing_rows():
    spread = lambda v: {"median": v, "min": v, "max": v}       # noqa: E731
    row = {"model": "m", "scheme": "f32", "gguf": "f32", "prompt": 128, "polyport": spread(64.0),
           "llama.cpp": spread(80.0), "polyport_tok_s": spread(2000.0), "llama.cpp_tok_s": spread(1600.0),
           "ratio": spread(1.25), "load_avg": spread(1.0)}
    text = llama_cpp.markdown([], [], [], 2, [row])
    assert "| m | f32 (F32) | 128 | 64 (64–64) | 80 (80–80) | **1.25x** (1.25–1.25) | 2,000 | 1,600 | 1.0 |" in text


@pytest.mark.slow
@needs_libllama
def test_llama_cpp_prompt_child_reprocesses_the_prompt_on_an_emptied_cache(tmp_path):
    """Each timed prompt call starts from an emptied cache (a stale one would make llama_decode refuse positions
    0.. again), and gives the logits a fresh context gives."""
    import big_model
    bin_dir = llama_cpp.build()
    big_model.export_big(tmp_path, lambda m: None, "llama_tiny")
    gguf = llama_cpp.convert(tmp_path / "llama_tiny.hf", "f32", bin_dir)
    assert len(llama_cpp.llama_cpp_prompt(gguf, bin_dir, 24, 2, 1)) == 2
    ids = np.random.default_rng(0).integers(0, 100, 24)
    engine = llama_cpp.LlamaCpp(gguf, bin_dir, 26, 1)
    first = engine.decode(ids, 0)
    engine.ll.llama_memory_clear(engine.ll.llama_get_memory(engine.ctx), True)
    again = engine.decode(ids, 0)
    engine.close()
    assert np.abs(first - again).max() <= 1e-5 * np.abs(first).max()

"""benchmarks/engines.py: children that time one engine alone, the alternation and the ratios."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import engines  # noqa: E402

LLAMA = str(ROOT / "examples" / "models" / "llama_a.onnx")


def test_a_fixed_batch_is_skipped_with_its_reason():
    assert engines.token_ids(LLAMA, 1, 16).shape == (1, 16)
    with pytest.raises(engines.Skip, match="fixes batch at 1"):
        engines.token_ids(LLAMA, 8, 16)


def test_ratios_are_paired_per_round_and_skips_carry_through():
    def child(times_by_shape):
        return {"rows": [dict(batch=b, seq=s, **t) for (b, s), t in times_by_shape]}
    ort = [child([((1, 16), {"times_ms": [4.0, 4.0, 9.0]}), ((8, 16), {"skip": "the export fixes batch at 1"})]),
           child([((1, 16), {"times_ms": [6.0]}), ((8, 16), {"skip": "the export fixes batch at 1"})])]
    pp = [child([((1, 16), {"times_ms": [2.0, 2.0, 1.0]}), ((8, 16), {"skip": "the export fixes batch at 1"})]),
          child([((1, 16), {"times_ms": [1.0]}), ((8, 16), {"skip": "the export fixes batch at 1"})])]
    rows = engines.prefill_rows("m", {"ort": ort, "polyport": pp})
    assert rows[0]["ort_ms"] == {"median": 5.0, "min": 4.0, "max": 6.0, "n": 2}
    assert rows[0]["ratio"]["min"] == 2.0 and rows[0]["ratio"]["max"] == 6.0     # 4/2 and 6/1, not 6/2
    assert rows[0]["ratio_best"] == 4.0 / 1.0      # each engine's fastest round
    assert rows[1] == {"model": "m", "batch": 8, "seq": 16, "skip": "the export fixes batch at 1"}
    import compare
    row, = compare.bench_doc({"prefill": rows, "settings": {"rounds": 2, "warmup": 0}}, {}, False)["rows"]
    assert row["ratio_best"] == 4.0 / 1.0      # each engine's fastest round (what `report --baseline` gates)


def test_short_calls_are_timed_until_the_wall_time_floor(monkeypatch):
    clock = iter(range(0, 10_000))                     # each perf_counter() call: one more second
    monkeypatch.setattr(engines.time, "perf_counter", lambda: float(next(clock)))
    calls = []
    times = engines.time_calls(lambda: calls.append(1), runs=3, warmup=1, min_ms=10_000.0)
    assert len(times) == 10 and all(t == 1000.0 for t in times)       # 10 runs of 1 s fill 10 s, not 3 runs
    assert len(calls) == len(times) + 3          # warmup: 1 call, then until 2.5 s of it had passed
    assert len(engines.time_calls(lambda: None, runs=3, warmup=1)) == 3


def test_alternate_reverses_the_order_every_other_round(monkeypatch):
    calls = []
    monkeypatch.setattr(engines, "run_child", lambda spec: calls.append(spec["engine"]) or {"engine": spec["engine"]})
    out = engines.alternate([{"kind": "prefill", "engine": "a"}, {"kind": "prefill", "engine": "b"}], 3, lambda m: None)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [r["engine"] for r in out[1]] == ["b", "b", "b"]


def test_children_time_ort_the_triad_and_the_fma_peak_in_their_own_processes():
    out = engines.run_child({"kind": "prefill", "engine": "ort", "onnx": LLAMA, "shapes": [[1, 4], [8, 4]],
                             "runs": 2, "warmup": 1, "threads": 1})
    assert len(out["rows"][0]["times_ms"]) == 2 and all(t > 0 for t in out["rows"][0]["times_ms"])
    assert "fixes batch" in out["rows"][1]["skip"]
    bw = engines.run_child({"kind": "triad", "threads": 1, "runs": 2, "warmup": 1})
    assert len(bw["gbps"]) == 2 and all(0.1 < g < 10000 for g in bw["gbps"])
    peak = engines.run_child({"kind": "fma", "threads": 1, "runs": 2, "warmup": 1})
    # one core of any x86 CPU that runs these tests: 4 to 64 f32 multiply-adds a cycle at 1 to 6 GHz
    assert len(peak["gflops"]) == 2 and all(4 < g < 800 for g in peak["gflops"]), peak


def test_prefill_rows_say_what_fraction_of_the_fma_peak_each_engine_reached(llama_artifact):
    import compare
    flops = engines.prefill_flops(LLAMA, llama_artifact, 1, 128)
    from polyport.runtime.artifact import Artifact
    from polyport.runtime.cost import evaluate
    assert flops == evaluate(Artifact(llama_artifact).manifest["cost"]["flops"], {"seq": 128}) > 0
    assert flops > engines.prefill_flops(LLAMA, llama_artifact, 1, 16) * 8      # attention grows with seq^2
    row = {"model": "llama_a", "batch": 1, "seq": 128, "flops": flops, "ratio": {"median": 2.0, "min": 2, "max": 2},
           "ratio_best": 1.5,
           "polyport_ms": {"median": flops / 50e9 * 1e3, "min": 0, "max": 0},      # 50 GFLOP/s
           "ort_ms": {"median": flops / 25e9 * 1e3, "min": 0, "max": 0}}
    compare.peak_fractions([row], {"median": 100.0})
    assert row["polyport_peak_fraction"] == pytest.approx(0.5) and row["ort_peak_fraction"] == pytest.approx(0.25)
    doc = {"settings": {"threads": 2, "rounds": 1, "runs": 1}, "prefill": [row], "decode": {},
           "bandwidth_gbps": {"median": 20.0, "min": 20.0, "max": 20.0},
           "fma_gflops": {"median": 100.0, "min": 90.0, "max": 110.0}}
    text = compare.markdown(doc)
    assert "| **2.00x** (2.00–2.00) | 1.50x | 50% | 25% |" in text and "100 GFLOP/s (90–110)" in text


def test_a_failing_child_reports_its_error():
    with pytest.raises(RuntimeError, match="unknown engine"):
        engines.run_child({"kind": "prefill", "engine": "nope", "onnx": LLAMA, "shapes": [[1, 4]],
                           "runs": 1, "warmup": 0, "threads": 1})


def test_compare_prints_a_failed_model_as_rows_and_exits_1(monkeypatch, tmp_path, capsys):
    import compare

    def alternate(specs, rounds, log):
        if any(s["kind"] == "prefill" for s in specs):
            raise RuntimeError("prefill child (ort) failed: killed by SIGKILL (the kernel's OOM killer sends it)\n...")
        return [[{"gbps": [20.0], "gflops": [100.0]}] * rounds for _ in specs]
    monkeypatch.setattr(engines, "compile_cached", lambda p, work_dir, log, *a, **k: tmp_path)
    monkeypatch.setattr(engines, "alternate", alternate)
    rc = compare.main(["--work-dir", str(tmp_path), "--models", "llama_a", "--seq", "16", "--batch", "1",
                       "--no-decode", "--no-coexist"])
    assert rc == 1
    assert "| llama_a | 1 | 16 | – | – | not measured: prefill child (ort) failed: killed by SIGKILL" in capsys.readouterr().out

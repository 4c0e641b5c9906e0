"""`polyport generate` and `bench --decode` on a compiled cpu artifact (its own prefill/decode in model.so).

Slow: it shares test_generate_cpu.py's llama_a compile (about a minute when run alone). The numerics
of cpu decode against ORT are there; here the command line over them must give what the reference gives."""
from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import generator
from .test_generate_cpu import artifact

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpu_artifact():
    return artifact("llama_a")


def test_generate_on_cpu_equals_the_reference_without_recomputing(cli, cpu_artifact, tmp_path):
    ids = np.zeros((3, 17), np.int64)
    lengths = [3, 9, 17]
    for b, n in enumerate(lengths):
        ids[b, :n] = np.random.default_rng(b).integers(0, 256, n)
    np.save(tmp_path / "ids.npy", ids)
    r = cli("generate", cpu_artifact, "--target", "cpu", "--input-ids", tmp_path / "ids.npy", "--lengths", "3,9,17",
            "--max-new-tokens", "12", "--json")
    assert r.exit_code == 0, r.stderr
    assert "recomputes" not in r.stderr
    want = generator("llama_a").generate(ids, 12, lengths=lengths)
    assert json.loads(r.stdout)["tokens"] == want.tolist()


def test_bench_decode_measures_cpu_ttft_and_tpot(cli, cpu_artifact, tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", cpu_artifact, "--decode", "--context", "8", "--context", "32", "--target", "cpu",
            "--runs", "3", "--warmup", "1", "--json", out)
    assert r.exit_code == 0, r.stderr
    rows = [row for row in json.loads(out.read_text())["rows"] if row["kind"] == "measured"]
    assert {(row["seq"], row["phase"]) for row in rows} == {(8, "ttft"), (8, "tpot"), (32, "ttft"), (32, "tpot")}
    assert all(row["median_ms"] > 0 and row["runs"] == 3 for row in rows)

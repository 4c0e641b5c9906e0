"""`polyport bench` / `polyport report` on an artifact run by the reference executor (a fake loader).

No timing assertions: only the schema, the measured / estimated labels, the
report's contents and the regression gate's exit code.
"""
import json

import numpy as np
import pytest

from polyport.compiler import signature
from polyport.errors import PolyportError
from polyport.ir import dtypes
from polyport.ir.graph import Graph
from polyport.ir.symbolic import sym
from polyport.ir.types import TensorType
from polyport.runtime import bench as benchmod
from polyport.runtime.artifact import ArtifactWriter
from polyport.runtime.cost import graph_cost
from polyport.runtime.reference import ReferenceSession

F32 = dtypes.F32
SEQ = sym("seq")


def tiny_graph() -> Graph:
    g = Graph()
    g.opset_imports[""] = 21
    x = g.add_input("x", TensorType(F32, (1, SEQ, 16)))
    w = g.add_constant("w", np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    mm = g.make_node("MatMul", [x, w], types=[TensorType(F32, (1, SEQ, 8))])
    g.set_outputs(mm.outputs)
    return g


class FakeSession:
    """What a target's session offers bench, run by the reference executor."""

    def __init__(self, graph, sig):
        self._ref = ReferenceSession(graph)
        self.signature = sig
        self.input_names = self._ref.input_names
        self.output_names = self._ref.output_names
        self.calls = 0

    def run(self, feeds):
        self.calls += 1
        return self._ref.run(feeds)


@pytest.fixture
def art(tmp_path):
    graph = tiny_graph()
    path = tmp_path / "tiny.art"
    with ArtifactWriter(path, signature(graph, "tiny")) as w:
        w.write_weights({v.name: v.const for v in graph.constants.values()})
        w.manifest["cost"] = graph_cost(graph)
        for target in ("cpu", "ascend"):
            w.target_dir(target)
            w.add_target(target, {"fake": True})
        w.commit()
    return path, graph


@pytest.fixture
def loader(art):
    path, graph = art
    sessions = []

    def load(p, target):
        from polyport.runtime.artifact import Artifact
        s = FakeSession(graph, Artifact(p).signature)
        s.target = target
        sessions.append(s)
        return s

    load.sessions = sessions
    return load


def test_bench_rows_schema_and_labels(art, loader):
    doc = benchmod.bench(art[0], seqs=(1, 4), runs=3, warmup=1, loader=loader)
    assert doc["model"] == "tiny" and doc["machine"]["cpus"] >= 1
    for row in doc["rows"]:
        assert set(benchmod.ROW_KEYS) <= set(row)
    kinds = {(r["target"], r["kind"]) for r in doc["rows"]}
    # cpu is here: measured; ascend is built but only emulated here: estimated, never timed
    assert kinds == {("cpu", "measured"), ("cuda", "estimated"), ("rocm", "estimated"), ("ascend", "estimated")}
    assert [s.target for s in loader.sessions] == ["cpu"]
    assert loader.sessions[0].calls == 2 * (1 + 3)              # per seq: warm-up + runs
    measured = [r for r in doc["rows"] if r["kind"] == "measured"]
    assert [r["seq"] for r in measured] == [1, 4] and all(r["runs"] == 3 for r in measured)
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["spread_ms"] >= 0 for r in measured)
    devices = {(r["target"], r["device"]) for r in doc["rows"] if r["kind"] == "estimated"}
    assert devices == {("cuda", "NVIDIA H100 SXM"), ("cuda", "NVIDIA H200 SXM"), ("rocm", "AMD Instinct MI300X"),
                       ("ascend", "Huawei Ascend 910B3")}
    est = next(r for r in doc["rows"] if r["kind"] == "estimated" and r["seq"] == 4)
    assert est["p90_ms"] is None and est["runs"] == 0 and est["bound"] in ("compute", "memory")
    assert est["flops"] == 2 * 4 * 8 * 16


def test_bench_device_option_and_errors(art, loader):
    doc = benchmod.bench(art[0], targets=["cuda"], seqs=(2,), device="H200", loader=loader)
    assert [(r["target"], r["device"], r["kind"]) for r in doc["rows"]] == [("cuda", "NVIDIA H200 SXM", "estimated")]
    doc = benchmod.bench(art[0], targets=["cpu"], seqs=(2,), runs=1, warmup=0, device="cpu", loader=loader)
    assert [r["kind"] for r in doc["rows"]] == ["measured", "estimated"]
    with pytest.raises(PolyportError, match="unknown device"):
        benchmod.bench(art[0], device="tpu", loader=loader)
    with pytest.raises(PolyportError, match="unknown target"):
        benchmod.bench(art[0], targets=["metal"], loader=loader)


def test_bench_without_cost_notes_it(tmp_path, loader, art):
    manifest = json.loads((art[0] / "manifest.json").read_text())
    del manifest["cost"]
    (art[0] / "manifest.json").write_text(json.dumps(manifest))
    doc = benchmod.bench(art[0], seqs=(1,), runs=1, warmup=0, loader=loader)
    assert {r["kind"] for r in doc["rows"]} == {"measured"}
    assert any("no cost" in n for n in doc["notes"])


def _write(path, doc):
    benchmod.write_json(path, doc)
    return path


def test_report_tables_keep_measured_and_estimated_apart(art, loader, tmp_path, cli):
    doc = benchmod.bench(art[0], seqs=(1, 4), runs=2, warmup=0, loader=loader)
    f = _write(tmp_path / "run.json", doc)
    assert json.loads(f.read_text())["rows"] == doc["rows"]
    r = cli("report", f)
    assert r.exit_code == 0, r.stderr
    measured, _, estimated = r.stdout.partition("\nestimated")
    assert measured.startswith("measured")
    assert "cpu" in measured and "H200" not in measured and "910B3" not in measured
    for name in ("NVIDIA H100 SXM", "NVIDIA H200 SXM", "AMD Instinct MI300X", "Huawei Ascend 910B3"):
        assert name in estimated
    assert "LOWER BOUND" in estimated and "cpu " not in estimated.split("\n", 1)[1]


def test_report_regression_gate(art, loader, tmp_path, cli):
    doc = benchmod.bench(art[0], seqs=(1, 4), runs=2, warmup=0, loader=loader)
    base = _write(tmp_path / "base.json", doc)
    slower = json.loads(json.dumps(doc))
    for row in slower["rows"]:
        if row["kind"] == "measured" and row["seq"] == 4:
            row["median_ms"] *= 1.5
        if row["kind"] == "estimated":
            row["median_ms"] *= 100            # estimates never gate
    cur = _write(tmp_path / "cur.json", slower)
    r = cli("report", cur, "--fail-if-slower", "10", "--baseline", base)
    assert r.exit_code == 1
    assert "regression: tiny cpu seq 4" in r.stderr and "seq 1:" not in r.stderr
    r = cli("report", cur, "--fail-if-slower", "60", "--baseline", base)
    assert r.exit_code == 0, r.stderr
    r = cli("report", cur, "--fail-if-slower", "10")
    assert r.exit_code == 2 and "--baseline" in r.stderr


def test_report_bad_input_and_plot(tmp_path, cli):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = cli("report", bad)
    assert r.exit_code == 2 and "not a polyport bench file" in r.stderr
    good = _write(tmp_path / "good.json", {"model": "m", "machine": {}, "rows": [
        {"target": "cpu", "device": "d", "seq": 1, "kind": "measured", "median_ms": 1.0, "p90_ms": 1.1,
         "spread_ms": 0.1, "runs": 3}]})
    r = cli("report", good, "--plot", tmp_path / "p.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.exit_code == 2 and "matplotlib" in r.stderr
    else:
        assert r.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 0


def test_bench_cli_with_patched_loader(art, monkeypatch, tmp_path, cli):
    path, graph = art
    import polyport.runtime.session as session
    from polyport.runtime.artifact import Artifact
    monkeypatch.setattr(session, "load", lambda p, target: FakeSession(graph, Artifact(p).signature))
    out = tmp_path / "b.json"
    r = cli("bench", path, "--seq", "2", "--runs", "2", "--warmup", "0", "--json", out)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(out.read_text())
    assert {row["kind"] for row in doc["rows"]} == {"measured", "estimated"}
    assert "measured" in r.stdout and "estimated" in r.stdout
    r = cli("bench", path, "--target", "rocm", "--device", "h100")
    assert r.exit_code == 0 and "H100" in r.stdout and "MI300X" not in r.stdout


def _ratio_doc(ratios):
    """A compare.py --bench-json document: rows name their model and carry their ratio to ORT."""
    rows = [{"model": m, "target": "cpu", "device": "some cpu", "seq": s, "kind": "measured", "median_ms": 1.0,
             "p90_ms": None, "spread_ms": 0.1, "runs": 3, "ort_ms": r, "ratio_vs_ort": r, "ratio_min": r * 0.9,
             "ratio_max": r * 1.1} for (m, s), r in ratios.items()]
    rows.append({"model": "llama_a", "target": "cuda", "device": "NVIDIA H100 SXM", "seq": 128, "kind": "estimated",
                 "median_ms": 0.01, "p90_ms": None, "spread_ms": None, "runs": 0})
    return {"schema": 1, "model": "corpus", "machine": {}, "rows": rows}


def test_report_baseline_gates_ratios_to_ort_at_25_percent(tmp_path, cli):
    base = _write(tmp_path / "base.json", _ratio_doc({("llama_a", 128): 2.0, ("qwen3_moe_a", 128): 4.0}))
    # absolute times differ (another machine); only the ratios count
    ok = _write(tmp_path / "ok.json", _ratio_doc({("llama_a", 128): 1.55, ("qwen3_moe_a", 128): 4.4}))
    r = cli("report", ok, "--baseline", base)
    assert r.exit_code == 0, r.stderr
    assert "2 measured row(s) within 25%" in r.stdout and "ORT/polyport" in r.stdout and "1.55x" in r.stdout
    bad = _write(tmp_path / "bad.json", _ratio_doc({("llama_a", 128): 1.45, ("qwen3_moe_a", 128): 4.0}))
    r = cli("report", bad, "--baseline", base)
    assert r.exit_code == 1
    assert "regression: llama_a cpu seq 128: ORT/polyport 1.45x vs baseline 2.00x" in r.stderr
    assert "qwen3_moe_a" not in r.stderr
    assert cli("report", bad, "--baseline", base, "--fail-if-slower", "30").exit_code == 0


def test_report_baseline_gates_the_fastest_rounds_where_both_rows_have_them(tmp_path, cli):
    """A slow ORT round lifts the median ratio and hides a slower polyport; the fastest rounds' ratio does not."""
    def doc(median, best):
        d = _ratio_doc({("llama_a", 128): median})
        if best is not None:
            d["rows"][0]["ratio_best"] = best
        return d
    base = _write(tmp_path / "base.json", doc(1.2, 1.2))
    r = cli("report", _write(tmp_path / "slow.json", doc(0.95, 0.7)), "--baseline", base)
    assert r.exit_code == 1
    assert "ORT/polyport 0.70x vs baseline 1.20x, the fastest rounds" in r.stderr
    assert cli("report", _write(tmp_path / "ok.json", doc(0.8, 1.1)), "--baseline", base).exit_code == 0
    # a baseline row without the figure (written before it): the median ratio is gated
    old = _write(tmp_path / "old.json", doc(1.2, None))
    r = cli("report", _write(tmp_path / "slow2.json", doc(0.85, 1.2)), "--baseline", old)
    assert r.exit_code == 1 and "vs baseline 1.20x, the median of rounds" in r.stderr


def test_report_baseline_compares_ratios_on_like_cpus_first(tmp_path, cli):
    """A baseline with rows for two CPUs gates each against its own; a third CPU against the file's first."""
    avx512 = _ratio_doc({("llama_a", 128): 1.4})
    avx2 = _ratio_doc({("llama_a", 128): 1.1})
    for row in avx2["rows"]:
        row["device"] = "other cpu"
    base = _write(tmp_path / "base.json", {**avx512, "rows": avx512["rows"] + avx2["rows"]})
    # 0.9x: within 25% of the other cpu's 1.1x, not of 1.4x
    this = _ratio_doc({("llama_a", 128): 0.9})
    for row in this["rows"]:
        row["device"] = "other cpu"
    assert cli("report", _write(tmp_path / "a.json", this), "--baseline", base).exit_code == 0
    r = cli("report", _write(tmp_path / "b.json", _ratio_doc({("llama_a", 128): 0.9})), "--baseline", base)
    assert r.exit_code == 1 and "vs baseline 1.40x" in r.stderr
    third = _ratio_doc({("llama_a", 128): 0.9})
    for row in third["rows"]:
        row["device"] = "third cpu"
    r = cli("report", _write(tmp_path / "c.json", third), "--baseline", base)
    assert r.exit_code == 1 and "vs baseline 1.40x" in r.stderr


def test_report_plots_ratios_with_the_baseline(tmp_path, cli):
    pytest.importorskip("matplotlib")
    base = _write(tmp_path / "base.json", _ratio_doc({("llama_a", 128): 2.0}))
    cur = _write(tmp_path / "cur.json", _ratio_doc({("llama_a", 128): 1.9}))
    r = cli("report", cur, "--baseline", base, "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

"""Fixtures for the fusion tests: small ONNX graphs, fusing them, and the real-model corpus.

The corpus is examples/models (made by examples/export_hf.py); set POLYPORT_MODELS
to another directory with the same layout (corpus.json + *.onnx) to use that one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from polyport.frontend import import_onnx
from polyport.ir.graph import Graph
from polyport.ir.stats import graph_stats
from polyport.passes.manager import PassManager
from polyport.runtime.reference import ReferenceSession

from ..families import FIRST_FAMILIES

MY_PASSES = ["canonicalize", "fuse-rmsnorm", "fuse-rotary", "fuse-gated-mlp", "canonicalize"]
REAL_SEQS = (7, 33)


def _corpus_dir() -> pathlib.Path:
    env = os.environ.get("POLYPORT_MODELS")
    return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2] / "examples" / "models"


def corpus() -> dict[str, dict]:
    path = _corpus_dir() / "corpus.json"
    return json.loads(path.read_text())["models"] if path.exists() else {}


def _build(nodes, inputs: dict[str, list], outputs: list[str], consts: dict[str, np.ndarray] = (),
           opset: int = 20, dtype=TensorProto.FLOAT) -> Graph:
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, dtype, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(consts).items()])
    return import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


@pytest.fixture
def build():
    """build(nodes, {input: shape}, [outputs], {name: constant}): an IR graph; shapes may use "seq"."""
    return _build


@dataclasses.dataclass
class Fused:
    graph: Graph
    counts: dict[str, int]
    notes: list[str]

    @property
    def ops(self) -> dict[str, int]:
        return dict(graph_stats(self.graph)["ops"])

    def node(self, op: str):
        (n,) = [n for n in self.graph.nodes if n.op_type == op]
        return n


def run_graph(g: Graph, seqs=(2, 5), seed: int = 0) -> list[dict]:
    outs = []
    for seq in seqs:
        rng = np.random.default_rng(seed + seq)
        feeds = {v.name: rng.standard_normal([seq if not isinstance(d, int) else d for d in v.shape])
                 .astype(v.dtype.numpy) for v in g.inputs}
        outs.append(ReferenceSession(g, check_types=True).run(feeds))
    return outs


@pytest.fixture
def fuse():
    """fuse(make_graph, *passes): run canonicalize + passes, check the numerics did not change."""
    def run(make, *passes: str, atol: float = 1e-5) -> Fused:
        before, after = make(), make()
        pm = PassManager(["canonicalize", *passes])
        pm.run(after)
        for want, got in zip(run_graph(before), run_graph(after)):
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=atol)
        counts: dict[str, int] = {}
        notes: list[str] = []
        for r in pm.records[1:]:
            counts.update(r.counts)
            notes.extend(r.notes)
        return Fused(after, counts, notes)
    return run


def _logits(g: Graph, seq: int, vocab: int) -> np.ndarray:
    ids = np.random.default_rng(seq).integers(0, vocab, size=(1, seq), dtype=np.int64)
    return ReferenceSession(g).run({"input_ids": ids})[g.outputs[0].name]


@dataclasses.dataclass
class RealModel:
    name: str
    entry: dict                   # corpus.json entry (family, hf_config, layer counts)
    graph: Graph                  # after canonicalize + the fusions
    ops_canonical: dict[str, int]  # op histogram after canonicalize alone
    records: list                 # the pass manager's records (time, counts, notes per pass)
    rel_err: dict[int, float]     # seq -> max |after - before| / max |before| over the logits

    @property
    def ops(self) -> dict[str, int]:
        return dict(graph_stats(self.graph)["ops"])

    def fused(self, op: str) -> list:
        return [n for n in self.graph.nodes if n.domain == "polyport" and n.op_type == op]

    def notes(self, pass_name: str) -> list[str]:
        return [n for r in self.records if r.name == pass_name for n in r.notes]


_REAL: dict[str, RealModel] = {}


@pytest.fixture(scope="session")
def real_model():
    """real_model(name): the export after canonicalize + the fusions (cached), logits compared before/after."""
    def get(name: str) -> RealModel:
        if name not in _REAL:
            entry = corpus()[name]
            path = _corpus_dir() / entry["file"]
            before, after = import_onnx(path), import_onnx(path)
            canon = PassManager(MY_PASSES[:1])
            canon.run(after)
            ops_canonical = dict(graph_stats(after)["ops"])
            pm = PassManager(MY_PASSES[1:])
            pm.run(after)
            vocab = after.outputs[0].shape[-1]
            rel = {}
            for seq in REAL_SEQS:
                want, got = _logits(before, seq, vocab), _logits(after, seq, vocab)
                rel[seq] = float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())
            _REAL[name] = RealModel(name, entry, after, ops_canonical, canon.records + pm.records, rel)
        return _REAL[name]
    return get


def pytest_generate_tests(metafunc):
    """Tests taking `real_name` run once per model of the first corpus families (skipped when there is none).

    Their per-pass counts (RMSNorm, Rotary, GatedMLP per layer) are derived from each family's config
    by rules these tests spell out for those families only; every family is checked end to end by
    tests/test_fusion_models.py (Attention / MoE per layer, logits against ONNX Runtime)."""
    if "real_name" in metafunc.fixturenames:
        names = sorted(n for n, e in corpus().items() if e["family"] in FIRST_FAMILIES) or [pytest.param("none", marks=pytest.mark.skip(
            reason=f"no corpus.json in {_corpus_dir()} (set POLYPORT_MODELS)"))]
        metafunc.parametrize("real_name", names)

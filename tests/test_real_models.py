"""Real Hugging Face exports: import with `seq` symbolic, run, match ONNX Runtime, re-export."""
import numpy as np
import onnx
import pytest

from polyport.frontend import export_onnx, import_onnx
from polyport.ir.stats import graph_stats
from polyport.ir.symbolic import sym
from polyport.ir.verifier import verify
from polyport.runtime.reference import ReferenceSession

from . import families
from .real_models import assert_logits_close, corpus, model_path, ort_run, token_ids

NAMES = sorted(corpus())
LENGTHS = (7, 33)


@pytest.fixture(scope="module", params=families.params(NAMES, "reference"))
def imported(request):
    name = request.param
    return name, import_onnx(model_path(name))


def _vocab(graph):
    return graph.outputs[0].shape[-1]


def test_seq_stays_symbolic(imported):
    name, graph = imported
    verify(graph)
    (ids,) = graph.inputs
    assert ids.name == "input_ids" and ids.shape == (1, sym("seq"))
    assert graph.outputs[0].shape[:2] == (1, sym("seq")), graph.outputs[0].type
    # Shape arithmetic over seq is folded at import: no Shape op survives.
    assert "Shape" not in graph_stats(graph)["ops"], name


@pytest.mark.parametrize("seq", LENGTHS)
def test_reference_matches_onnxruntime(imported, seq):
    name, graph = imported
    feeds = token_ids(seq, _vocab(graph))
    got = ReferenceSession(graph, check_types=True).run(feeds)["logits"]
    (want,) = ort_run(model_path(name), feeds)
    assert_logits_close(got, want)


def test_reexport_runs_in_onnxruntime(imported):
    name, graph = imported
    model = export_onnx(graph)
    onnx.checker.check_model(model)
    for seq in LENGTHS:
        feeds = token_ids(seq, _vocab(graph))
        (got,) = ort_run(model, feeds)
        (want,) = ort_run(model_path(name), feeds)
        assert_logits_close(got, want)

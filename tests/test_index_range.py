"""Token ids outside the embedding are refused the same way on every target.

A cpu kernel wraps an id >= vocab (the result for id mod vocab, exit 0) where
ONNX Runtime and the reference executor fail: the compiler records each index
input's range in the manifest signature and every session checks feeds
against it (cuda and rocm share the cpu session's VmSession.run).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import polyport.runtime.session as session
from polyport import errors
from polyport.frontend.onnx_import import import_onnx
from polyport.ir.index_inputs import index_ranges
from polyport.runtime.reference import ReferenceSession

from .real_models import assert_logits_close, model_path, ort_run

VOCAB = 256
BAD = [VOCAB, VOCAB + 5, 2**40, -VOCAB - 1, -(2**40)]


@pytest.fixture(scope="module")
def sessions(llama_artifact):
    return {"reference": ReferenceSession(import_onnx(model_path("llama_a"))),
            "cpu": session.load(llama_artifact, "cpu"), "ascend": session.load(llama_artifact, "ascend")}


def test_manifest_records_the_range(llama_artifact):
    spec = json.loads((llama_artifact / "manifest.json").read_text())["model"]["inputs"][0]
    assert spec["name"] == "input_ids" and spec["index_range"] == [-VOCAB, VOCAB - 1]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("target", ["reference", "cpu", "ascend"])
def test_out_of_range_ids_refused_everywhere(sessions, target, bad):
    ids = np.array([[3, 7, bad, 1]], dtype=np.int64)
    with pytest.raises(errors.InputError) as e:
        sessions[target].run({"input_ids": ids})
    assert str(e.value) == (f"input 'input_ids': value {bad} at [0, 2] is outside the valid index range "
                            f"[-{VOCAB}, {VOCAB - 1}] (it indexes an axis of size {VOCAB})")


def test_in_range_negative_ids_match_onnxruntime(sessions):
    ids = np.array([[-1, -VOCAB, 0, VOCAB - 1, 5]], dtype=np.int64)
    want = ort_run(model_path("llama_a"), {"input_ids": ids})[0]
    for target in ("reference", "cpu"):
        assert_logits_close(sessions[target].run({"input_ids": ids})["logits"], want)


def test_index_inputs_found_through_reshape():
    """deepseek_v4 also gathers its hash-routing table with the ids, after a Reshape."""
    g = import_onnx(model_path("deepseek_v4_a"))
    assert index_ranges(g) == {"input_ids": (-256, 255)}

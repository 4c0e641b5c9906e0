"""The fused ops' schemas: the builder checks attributes, `attrs_of` supplies the defaults, and
MoE hash routing rejects token ids outside the table's rows everywhere (reference, emulator, feeds)."""
from __future__ import annotations

import numpy as np
import pytest

from polyport import errors
from polyport.compiler import signature
from polyport.frontend.onnx_import import import_onnx
from polyport.ir import dtypes, fused
from polyport.ir.graph import Graph
from polyport.ir.ops import attrs_of, checked_attrs
from polyport.ir.types import TensorType
from polyport.passes.pipelines import run_pipeline
from polyport.runtime.reference import check_feeds
from polyport.runtime.session import signature_index_ranges, signature_types
from tests.real_models import model_path


@pytest.mark.parametrize("attrs,message", [
    ({"top_k": 2, "expert_choice": "x"}, "unknown attribute 'expert_choice'"),
    ({"scoring": "softmax"}, "attribute 'top_k' is required"),
    ({"top_k": 2, "scoring": "relu"}, "'scoring' is 'relu'; one of softmax, sigmoid, sqrtsoftplus"),
    ({"top_k": "2"}, "attribute 'top_k' must be int"),
])
def test_builder_checks_attributes_against_the_schema(attrs, message):
    with pytest.raises(errors.PolyportError, match=message):
        checked_attrs("MoE", attrs)


def test_defaults_come_from_the_schema_and_are_not_stored():
    g = Graph("g")
    x = g.add_input("x", TensorType(dtypes.F32, (2, 8)))
    y = fused.build(g, "GatedMLP", [x, x, x, x], {"clamp": 7}, x.type)
    node = y.producer
    assert node.attrs == {"clamp": 7.0} and isinstance(node.attrs["clamp"], float)
    assert attrs_of(node) == {"activation": "silu", "clamp": 7.0}


def _moe_inputs(rng, t=5, h=8, e=4, i=6, vocab=3):
    x = rng.standard_normal((t, h)).astype(np.float32)
    rw = rng.standard_normal((h, e)).astype(np.float32)
    wg, wu = (rng.standard_normal((e, h, i)).astype(np.float32) for _ in range(2))
    wd = rng.standard_normal((e, i, h)).astype(np.float32)
    table = rng.integers(0, e, (vocab, 2))
    return [x, rw, None, wg, wu, wd, table]


@pytest.mark.parametrize("bad", [-1, 3])
def test_reference_rejects_hash_ids_outside_the_table(bad):
    ins = _moe_inputs(np.random.default_rng(0))
    ok = fused.evaluate("MoE", ins + [np.array([0, 1, 2, 2, 0])], top_k=2)
    assert ok.shape == (5, 8)
    with pytest.raises(errors.InputError, match=rf"token id {bad} is outside the MoE hash table's rows \[0, 3\)"):
        fused.evaluate("MoE", ins + [np.array([0, 1, bad, 2, 0])], top_k=2)


@pytest.mark.parametrize("bad", [-1, 256])
def test_compiled_sessions_check_hash_ids_at_the_feeds(bad):
    """The manifest's index range of a token-id input covers MoE hash routing ([0, rows)), not only the
    embedding Gather (which would take -256..255); every artifact session checks it before running."""
    graph = import_onnx(model_path("deepseek_v4_a"))
    run_pipeline(graph)
    sig = signature(graph, "m")
    assert [s.get("index_range") for s in sig["inputs"]] == [[0, 255]]
    specs, ranges = signature_types(sig["inputs"]), signature_index_ranges(sig["inputs"])
    check_feeds(specs, {"input_ids": np.array([[0, 255]])}, ranges)
    with pytest.raises(errors.InputError, match=rf"input 'input_ids': value {bad} .* outside the valid index range"):
        check_feeds(specs, {"input_ids": np.array([[0, bad]])}, ranges)

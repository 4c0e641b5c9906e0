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
    ({"top_k": 2, "routing": "x"}, "unknown attribute 'routing'"),
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


def test_kv_compress_pools_complete_windows():
    from polyport.ir.infer import infer_node
    from polyport.ir.symbolic import parse
    g = Graph("g")
    kv = g.add_input("kv", TensorType(dtypes.F32, (1, parse("seq"), 8)))

    def inferred(bias, name, **attrs):
        out = fused.build(g, "KVCompress", [kv, kv, g.add_constant(name, bias)], attrs, None, name=name)
        return infer_node(out.producer, {"": 18})[0]

    assert inferred(np.zeros((4, 8), np.float32), "ok", rate=4, overlap=1).shape == (1, parse("seq // 4"), 4)
    want = r"node bad\S* \(polyport::KVCompress\): position_bias is f32\[3, 8\], expected \[4, 8\]"
    with pytest.raises(errors.PolyportError, match=want):
        inferred(np.zeros((3, 8), np.float32), "bad", rate=4)
    x = np.arange(2 * 9 * 2, dtype=np.float32).reshape(2, 9, 2)
    zero = np.zeros((4, 2), np.float32)
    hca = fused.evaluate("KVCompress", [x, np.zeros_like(x), zero], rate=4)           # equal gates: the mean
    np.testing.assert_allclose(hca, x[:, :8].reshape(2, 2, 4, 2).mean(2))              # token 8 waits
    csa = fused.evaluate("KVCompress", [x, np.zeros_like(x), zero], rate=4, overlap=1)
    np.testing.assert_allclose(csa[:, 0, 0], x[:, :4, 1].mean(1))                      # window 0: its own half
    np.testing.assert_allclose(csa[:, 1, 0], np.concatenate([x[:, :4, 0], x[:, 4:8, 1]], 1).mean(1))


def test_sparse_indexer_keeps_the_top_k_complete_entries():
    q = np.ones((1, 6, 1, 2), np.float32)
    k = np.array([[[1, 0], [3, 0], [2, 0]]], np.float32)                              # scores 1, 3, 2
    w = np.ones((1, 6, 1), np.float32)
    mask = fused.evaluate("SparseIndexer", [q, k, w, np.arange(6)[None]], top_k=1, rate=2)[0, 0]
    keep = mask == 0
    assert mask.shape == (6, 3) and set(np.unique(mask)) <= {0.0, -np.inf}
    # entry t is complete after position 2t + 1: queries 0 sees none, 1-2 entry 0, 3-5 the best of 0-1
    assert keep.tolist() == [[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]]
    late = fused.evaluate("SparseIndexer", [q, k, w, 10 + np.arange(6)[None]], top_k=2, rate=2)[0, 0]
    assert ((late == 0) == [False, True, True]).all()                                 # the two best of three

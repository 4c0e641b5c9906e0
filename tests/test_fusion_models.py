"""The fusion issue's acceptance test, per real export: after the default pipeline a decoder
layer reads as a few fused ops, and the fused graph still matches ONNX Runtime.

Expected counts come from each model's Hugging Face config in corpus.json
(tests/families.py): one Attention per attention layer, one MoE per MoE
layer, one GatedMLP per gated dense MLP and per shared expert, no router
TopK/Softmax/Sigmoid and no per-token gather of expert weights left outside the
fused ops; where families.GAPS states a fusion gap, the count it states.
"""
import collections
import json

import numpy as np
import pytest

from polyport.frontend import import_onnx
from polyport.passes.pipelines import run_pipeline
from polyport.runtime.reference import ReferenceSession

from . import families
from .real_models import MODELS as MODELS_DIR, assert_logits_close, ort_run, token_ids


def _all_exports() -> dict[str, dict]:
    """The corpus and its variants (examples/models/<variant>/: the same models exported
    with sdpa attention or at opset 23): the same fusions must fire on every spelling."""
    found = {}
    for corpus_file in sorted(MODELS_DIR.glob("**/corpus.json")):
        variant = corpus_file.parent.relative_to(MODELS_DIR).as_posix()
        for name, entry in json.loads(corpus_file.read_text())["models"].items():
            key = name if variant == "." else f"{variant}/{name}"
            found[key] = dict(entry, path=str(corpus_file.parent / entry["file"]))
    return found


MODELS = _all_exports()


def n_experts(cfg: dict) -> int | None:
    return (cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
            or cfg.get("moe_num_experts"))


def router_ops_left(graph, experts: int, hidden: int) -> list[str]:
    """TopK / Softmax / Sigmoid / Softplus nodes fed (through shape and elementwise ops) by a router
    MatMul/Gemm: a constant weight of shape [hidden, experts] or [experts, hidden]."""
    passthrough = {"Reshape", "Add", "Mul", "Div", "Cast", "Sigmoid", "Softmax", "Softplus", "Sqrt", "Where",
                   "Greater", "Transpose", "Squeeze", "Unsqueeze"}
    found = []
    for node in graph.nodes:
        if node.op_type not in ("TopK", "Softmax", "Sigmoid", "Softplus"):
            continue
        frontier, seen = [node.inputs[0]], 0
        while frontier and seen < 12:
            v = frontier.pop()
            seen += 1
            p = v.producer if v is not None else None
            if p is None:
                continue
            if p.op_type in ("MatMul", "Gemm"):
                w = p.inputs[1]
                if w.const is not None and sorted(w.const.shape) == sorted((hidden, experts)):
                    found.append(f"{node.op_type} {node.name}")
                    break
            elif p.op_type in passthrough:
                frontier.extend(i for i in p.inputs if i is not None)
    return found


def expert_weight_gathers(graph, experts: int) -> list[str]:
    return [n.name for n in graph.nodes if n.op_type in ("Gather", "GatherND") and n.inputs[0].const is not None
            and n.inputs[0].const.ndim == 3 and n.inputs[0].const.shape[0] == experts]


@pytest.fixture(scope="module", params=families.params(sorted(MODELS), "fusion"))
def fused(request):
    name = request.param
    graph = import_onnx(MODELS[name]["path"])
    before = len(graph)
    run_pipeline(graph, "default")
    return name, graph, before


def test_decoder_layers_read_as_fused_ops(fused):
    name, graph, before = fused
    entry = MODELS[name]
    ops = collections.Counter(n.qualified_op for n in graph.nodes)
    for op, want in families.fused_counts(name, entry).items():
        assert ops[op] == want, f"{name}: {ops[op]} {op}, expected {want} ({entry['description']})"
    assert len(graph) < before
    experts = n_experts(entry["hf_config"])
    if experts and families.gap(name, "moe") is None:
        assert router_ops_left(graph, experts, entry["hf_config"]["hidden_size"]) == []
        assert expert_weight_gathers(graph, experts) == []


@pytest.mark.parametrize("seq", (7, 33))
def test_fused_graph_matches_onnxruntime(fused, seq):
    name, graph, _ = fused
    feeds = token_ids(seq, MODELS[name]["vocab_size"])
    got = ReferenceSession(graph, check_types=True).run(feeds)["logits"]
    (want,) = ort_run(MODELS[name]["path"], feeds)
    assert_logits_close(got, want)

"""DeepSeek-V4 as published: DeepseekV4Config's default layer pattern (deepseek_v4_d in the corpus).

Four layers: heavily compressed attention (HCA, rate 8) in layers 0-2, compressed sparse
attention (CSA, rate 4, indexer top-4) in layer 3, the sliding window and sinks on every
layer; hash-routed MoE in layers 0-2, top-k routed in layer 3; mHC residual mixing. Each
layer kind must import, fuse (the compressors into KVCompress, the CSA indexer into SparseIndexer,
each compressed layer's attention over window + compressed entries into Attention), and compile
for cpu matching ONNX Runtime. The corpus-wide tests
cover the rest for this export too: reference vs ONNX Runtime and re-export (test_real_models.py),
fused graph vs ONNX Runtime (test_fusion_models.py), the ascend emulation (targets/test_ascend.py),
the cuda / rocm builds (targets/test_gpu_build.py, slow).
"""
import pytest

from polyport.frontend import import_onnx
from polyport.ir.symbolic import parse
from polyport.passes.pipelines import run_pipeline

from .real_models import corpus, model_path

NAME = "deepseek_v4_d"
# DeepseekV4Config(num_hidden_layers=4)'s defaults (transformers 5.23): 2 HCA, then CSA/HCA interleaved
# from HCA; the first 3 MLP layers hash-routed.
PATTERN = ["heavily_compressed_attention"] * 3 + ["compressed_sparse_attention"]
MLP_PATTERN = ["hash_moe"] * 3 + ["moe"]


@pytest.fixture(scope="module")
def fused():
    graph = import_onnx(model_path(NAME))
    run_pipeline(graph, "default")
    return graph


def test_corpus_entry_is_the_published_pattern():
    cfg = corpus()[NAME]["hf_config"]
    assert cfg["layer_types"] == PATTERN and cfg["mlp_layer_types"] == MLP_PATTERN
    assert cfg["sliding_window"] and cfg["num_key_value_heads"] == 1 and cfg["hc_mult"] > 1


def test_every_layer_fuses(fused):
    cfg = corpus()[NAME]["hf_config"]
    attn = [n for n in fused.nodes if n.op_type == "Attention"]
    moe = [n for n in fused.nodes if n.op_type == "MoE"]
    assert len(attn) == 4 and len(moe) == 4
    hca, csa = cfg["compress_rates"]["heavily_compressed_attention"], cfg["compress_rates"]["compressed_sparse_attention"]
    for node, kind in zip(attn, PATTERN):
        q, kv, v, mask, sinks = node.inputs
        assert kv is v and node.attrs["kv_heads"] == 1 and sinks.shape == (cfg["num_attention_heads"],)
        rate = hca if kind == "heavily_compressed_attention" else csa
        # window keys, then seq // rate compressed entries: a dim folded once at import
        assert kv.shape[2] == parse(f"seq + (seq // {rate})"), kv.type
        assert mask.shape[-2:] == (parse("seq"), kv.shape[2])
    # the compressed side: one KVCompress per HCA layer (rate 8), two per CSA layer (its keys and its
    # indexer's, overlapping windows of rate 4), and the CSA layer's indexer mask ends its attention mask
    comp = [n for n in fused.nodes if n.op_type == "KVCompress"]
    assert [(n.attrs["rate"], n.attrs["overlap"]) for n in comp] == [(hca, 0)] * 3 + [(csa, 1)] * 2
    (indexer,) = [n for n in fused.nodes if n.op_type == "SparseIndexer"]
    assert indexer.attrs["rate"] == csa and indexer.attrs["top_k"] == cfg["index_topk"]
    assert indexer.outputs[0] in attn[3].inputs[3].producer.inputs
    assert not [n for n in fused.nodes if n.op_type in ("TopK", "ScatterElements")]
    hashed = [len(n.inputs) > 6 and n.inputs[6] is not None for n in moe]   # hash_table operand
    assert hashed == [t == "hash_moe" for t in MLP_PATTERN]

"""benchmarks/gpu_check.py without a GPU: its plumbing on polyport's cpu target, and the clear stop for cuda.

A two-op ONNX model (Gather + MatMul, dynamic seq) keeps the compile to seconds; it has no attention,
so its generation check recomputes (the row says so). The generation check through the KV cache on a
real export is the slow test at the end.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((100, 8)).astype(np.float32), "emb")
    head = numpy_helper.from_array(rng.standard_normal((8, 12)).astype(np.float32), "head")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
         helper.make_node("MatMul", ["h", "head"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", 12])], initializer=[emb, head])
    path = tmp_path_factory.mktemp("gc") / "tiny_lm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_cpu_plumbing_mode(gpu_check, tiny_onnx, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    args = ["--work-dir", str(work), "--target", "cpu", "--gen-tokens", "3", "--gen-prompt", "2",
            "--models", str(tiny_onnx), "--seq", "1", "5",
            "--runs", "2", "--warmup", "0", "--gap-ms", "0"]
    assert gpu_check.main(args + ["--compile-only"]) == 0       # compile here, run later (the GPU machine)
    doc = json.loads((work / "gpu_check.json").read_text())
    assert doc["compiles"]["tiny_lm"]["status"] == "ok" and doc["rows"] == []
    assert doc["stopped"].endswith("(--compile-only)")
    assert gpu_check.main(args) == 0
    doc = json.loads((work / "gpu_check.json").read_text())
    assert doc["exit_code"] == 0 and not doc["failures"]
    assert doc["compiles"]["tiny_lm"]["status"] == "cached"
    rows = doc["rows"]
    assert [(r["model"], r["seq"], r["ok"], r["peer"]) for r in rows] == \
        [("tiny_lm", 1, True, "ORT CPU EP"), ("tiny_lm", 5, True, "ORT CPU EP")]
    assert all(r["max_abs_diff"] <= 1e-3 * r["max_abs_ort"] and r["runs"] == 2 for r in rows)
    gen = doc["generation"]
    assert [(g["model"], g["decode"], g["peer"], g["ok"], len(g["tokens"])) for g in gen] == \
        [("tiny_lm", "recompute", "ORT CPU EP", True, 3)]
    assert gen[0]["tokens"] == gen[0]["ort_tokens"] and gen[0]["peer_export"].startswith("cache-less")
    batch = doc["batch"]        # 8 prompts of 2 and 1 tokens: recomputed, each row against itself alone
    assert [(b["model"], b["batch"], b["programs"], b["ok"]) for b in batch] == [("tiny_lm", 8, "none (recompute)", True)]
    assert batch[0]["prompt_lengths"] == [2, 1, 1, 1] * 2 and batch[0]["max_abs_diff"] <= 1e-3 * batch[0]["max_abs_alone"]
    out = capsys.readouterr().out
    assert "tiny_lm" in out and "peer/polyport" in out and "peer (cache-less export)" in out

    # second run: the artifact is cached; a tolerance no result can meet is a numerics failure (exit 1)
    monkeypatch.setattr(gpu_check, "TOLERANCES", {"f32": -1.0})
    assert gpu_check.main(args[:-6] + ["--seq", "3", "--runs", "1", "--warmup", "0", "--gap-ms", "0"]) == 1
    doc = json.loads((work / "gpu_check.json").read_text())
    assert doc["compiles"]["tiny_lm"]["status"] == "cached"
    assert doc["exit_code"] == 1 and any(f.startswith("tiny_lm seq 3: max |diff|") for f in doc["failures"])
    assert "tiny_lm: a batch of 8 differs from each sequence alone" in doc["failures"]


def test_cuda_without_a_usable_gpu_stops_clearly(gpu_check, tiny_onnx, tmp_path, capsys):
    from polyport.runtime.gpu_session import device_problem
    if device_problem("cuda") is None:
        pytest.skip("a CUDA device is visible here")
    work = tmp_path / "work"
    assert gpu_check.main(["--work-dir", str(work), "--models", str(tiny_onnx), "--quick"]) == 2
    doc = json.loads((work / "gpu_check.json").read_text())
    # before the gpubuild branch: no cuda target to compile with; after it: compiled, then no device to run on
    assert "cannot compile tiny_lm: polyport has no 'cuda' target" in doc["stopped"] or \
        "stopping before the run: target cuda: no CUDA device is visible to TVM" in doc["stopped"]
    assert doc["environment"]["device"].startswith("no CUDA device is visible to TVM")
    assert "gpu_check: error:" in capsys.readouterr().err
    if doc["compiles"]["tiny_lm"]["status"] == "ok":        # the cpu target too: the generation check's reference
        from polyport.runtime.artifact import Artifact
        assert set(Artifact(doc["compiles"]["tiny_lm"]["artifact"]).targets) == {"cuda", "cpu"}


def test_greedy_tokens_agree_up_to_a_near_tie(gpu_check):
    agree, tie = gpu_check.tokens_agree, gpu_check.NEAR_TIE
    assert agree([1, 2, 3], [1, 2, 3], [1.0, 1.0, 1.0])
    assert not agree([1, 2, 3], [1, 2, 4], [1.0, 1.0, 1.0])
    assert agree([1, 2, 3], [1, 5, 6], [1.0, tie / 2, 1.0])      # they part at a near tie: both are right
    assert not agree([1, 2], [1, 2, 3], [1.0, 1.0, 1.0])
    assert gpu_check.build_targets("cuda", True) == ["cuda", "cpu"]
    assert gpu_check.build_targets("cuda", False) == ["cuda"] and gpu_check.build_targets("cpu", True) == ["cpu"]
    assert gpu_check.build_targets("cuda", True, "bf16") == ["cuda"]       # 16-bit cuda: ORT's loop is the reference
    assert agree([1, 2, 3], [1, 5, 6], [1.0, 1e-3, 1.0], gpu_check.TOLERANCES["bf16"])


def test_half_precision_cuda_compiles_without_a_gpu(gpu_check, tiny_onnx, tmp_path):
    """--dtype bf16 --compile-only: the cuda artifact computes in bf16, on its own (no cpu target beside it)."""
    from polyport.runtime.artifact import Artifact
    from polyport.targets.cuda import find_nvcc
    if find_nvcc() is None:
        pytest.skip("nvcc is not installed; run scripts/install_gpu_toolchains.sh")
    work = tmp_path / "work"
    assert gpu_check.main(["--work-dir", str(work), "--models", str(tiny_onnx), "--dtype", "bf16", "--arch", "sm_80",
                           "--compile-only"]) == 0
    art = Artifact(json.loads((work / "gpu_check.json").read_text())["compiles"]["tiny_lm"]["artifact"])
    assert art.path.name == "tiny_lm.cuda.bf16" and set(art.targets) == {"cuda"}
    assert gpu_check.compute_dtype(art.path, "cuda") == "bf16"
    from .targets.test_gpu_build import _device_module
    dev = _device_module(art.path / art.target_entry("cuda")["libraries"]["sm_80"], "cuda")
    assert dev.fmt == "fatbin" and sorted(dev.kernels) == art.target_entry("cuda")["kernels"]["sm_80"]


@pytest.mark.slow
def test_generation_check_decodes_through_the_cache(gpu_check, tmp_path):
    """A real export (llama_a) on the cpu target: the generation row decodes through the KV cache and its
    greedy tokens agree with ORT's greedy loop over the cache-less export; a batch of 8 prompts of different
    lengths decodes through one batched cache and agrees with each sequence decoded alone."""
    work = tmp_path / "work"
    assert gpu_check.main(["--work-dir", str(work), "--target", "cpu", "--models", "llama_a", "--seq", "1",
                           "--runs", "1", "--warmup", "0", "--gap-ms", "0", "--gen-tokens", "6"]) == 0
    gen = json.loads((work / "gpu_check.json").read_text())["generation"]
    assert [(g["decode"], g["ok"], len(g["tokens"])) for g in gen] == [("kv cache", True, 6)]
    assert gen[0]["tpot_ms"] > 0 and gen[0]["peer_tpot_ms"] > 0
    batch = json.loads((work / "gpu_check.json").read_text())["batch"]
    assert [(b["batch"], b["programs"], b["ok"]) for b in batch] == [(8, "batched", True)]
    assert batch[0]["prompt_lengths"] == [8, 6, 4, 2] * 2 and batch[0]["tpot_batch_ms"] > 0


def test_missing_model_is_exit_2(gpu_check, tmp_path):
    assert gpu_check.main(["--work-dir", str(tmp_path), "--target", "cpu", "--models", str(tmp_path / "no.onnx")]) == 2
    assert "no such model file" in json.loads((tmp_path / "gpu_check.json").read_text())["stopped"]

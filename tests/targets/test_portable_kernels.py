"""The portable kernel set: the unscheduled TE computes the GPU targets schedule with dlight.

No GPU is needed to check what they compute: the same lowering (`kernels="portable"`: TE
Attention, Relax routing + TE MoE experts, weights as stored) is built for LLVM by the cpu
target and compared with ONNX Runtime on the original export. Schedules only reorder and
bind loops, so a cuda/rocm build computes what passes here (GPU numerics themselves are
checked by benchmarks/gpu_check.py on a GPU).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import polyport.runtime.session as session
from polyport import errors
from polyport.compiler import compile_model
from polyport.targets.base import CompileOptions
from polyport.targets.tvm_lower import lower_to_relax

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"
CORPUS = json.loads((MODELS / "corpus.json").read_text())["models"]

# softmax / sigmoid + group-limited / sqrtsoftplus + hash routing; causal, windowed, sinks
CASES = ["mixtral_a", "deepseek_v3_b", "deepseek_v4_a"]


@pytest.mark.parametrize("name", CASES)
def test_portable_kernels_match_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = MODELS / CORPUS[name]["file"]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    art = compile_model(path, ["cpu"], tmp_path / "art", options=CompileOptions(extra={"kernels": "portable"}))
    meta = json.loads((art / "cpu" / "model.json").read_text())
    assert meta["packed"] == {}, "portable kernels bind every weight as stored"
    sess = session.load(art, "cpu")
    vocab = CORPUS[name]["vocab_size"]
    for seq in (1, 33):
        ids = np.random.default_rng(seq).integers(0, vocab, size=(1, seq), dtype=np.int64)
        feeds = {i.name: ids for i in ref.get_inputs()}
        want = ref.run(None, feeds)[0]
        got = sess.run(feeds)[sess.output_names[0]]
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{name} seq {seq}: relative error {err:.2e}"


def test_unknown_kernel_set_is_refused():
    from polyport.ir.graph import Graph
    with pytest.raises(errors.PolyportError, match="unknown kernel set 'fast'"):
        lower_to_relax(Graph("g"), "cpu", kernels="fast")

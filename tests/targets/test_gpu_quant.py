"""cuda / rocm builds of low-precision models: QuantMatMul's portable TE compute, scheduled by dlight, becomes a
device kernel in every arch's library (no GPU here: its numerics are tests/targets/test_cpu_quant.py's portable
test; benchmarks/gpu_check.py runs artifacts on a GPU)."""
from __future__ import annotations

import json

import pytest

from polyport.compiler import compile_model
from polyport.passes.quantize_weights import WeightQuantization
from polyport.targets.base import CompileOptions

from ..real_models import model_path
from .test_gpu_build import _device_module, _require


@pytest.mark.slow
@pytest.mark.parametrize("target,kind,how", [("cuda", "cuda", "int4"), ("rocm", "hip", "bf16")])
def test_low_precision_llama_builds_quant_kernels(tmp_path, target, kind, how):
    """With --quantize-embeddings the table's gather (QuantGather's TE compute) is a device kernel too."""
    _require(target)
    if how == "bf16":            # bf16 weights with f32 compute (--dtype bf16 alone computes in bf16: test_half_compute)
        opts = dict(options=CompileOptions(dtype="bf16", compute="f32"),
                    quantization=WeightQuantization("bf16", lm_head=True, embeddings=True))
    else:
        opts = dict(quantization=WeightQuantization("int4", 32, embeddings=True))
    out = compile_model(model_path("llama_a"), [target], tmp_path / "art", **opts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == how and manifest["quantization"]["embeddings"]
    entry = manifest["targets"][target]
    for arch, lib in entry["libraries"].items():
        kernels = _device_module(out / lib, kind).kernels
        for name in ("quant_matmul", "quant_gather"):
            assert any(k.startswith(name) for k in kernels), f"{arch}: {sorted(kernels)}"

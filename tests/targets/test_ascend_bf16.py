"""The ascend target in bfloat16 (`compile --target ascend --dtype bf16`): every CANN operator it calls takes
bfloat16 on Atlas A2 (targets/ascend/limits.py DEVICE_FLOAT_DTYPES), so the whole emitted graph, its weights and
the paged KV caches of the derived programs are bfloat16, and the emulator computes in it (every op rounds to
bf16, cube ops and norms accumulate in fp32). Emulated logits match the fp32 reference executor within the bf16
tolerance (passes/region.py: 6.25e-2 x max|logit|; measured 6e-3 .. 1.2e-2), the reference routed as the
emulator routed (tests/targets/test_ascend.py says why)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

import polyport
from polyport.compiler import compile_model
from polyport.frontend.onnx_import import import_onnx
from polyport.ir import dtypes
from polyport.passes.pipelines import run_pipeline
from polyport.passes.region import tolerance
from polyport.runtime.reference import ReferenceSession
from polyport.targets.ascend.limits import AscendFallbackWarning
from polyport.targets.base import CompileOptions

from ..real_models import assert_logits_close, corpus, model_path
from .test_ascend import _compare

TOL = tolerance(dtypes.BF16)


def build(name: str, tmp_path, generation: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AscendFallbackWarning)      # MLA's recorded fallbacks (test_ascend.py)
        return compile_model(model_path(name), ["ascend"], tmp_path / name, options=CompileOptions(dtype="bf16"),
                             generation=generation)


def fused(name: str):
    g = import_onnx(model_path(name))
    run_pipeline(g)
    return g


def check(name: str, tmp_path, monkeypatch) -> None:
    art = build(name, tmp_path)
    entry = json.loads((art / "manifest.json").read_text())["targets"]["ascend"]
    assert entry["compute_dtype"] == "bfloat16" and "bfloat16" in entry["runtime"]
    plan = json.loads((art / "ascend" / "op_plan.json").read_text())
    assert plan["compute_dtype"] == "bfloat16"
    model = onnx.load(str(art / "ascend" / "model.onnx"), load_external_data=False)
    floats = {i.data_type for i in model.graph.initializer} & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    assert floats == {onnx.TensorProto.BFLOAT16}, "weights are bf16, none f16"
    assert "--precision_mode=must_keep_origin_dtype" in (art / "ascend" / "atc.sh").read_text()
    assert polyport.load(art, "ascend").notice.endswith("contracts in bfloat16; nothing was run on Ascend hardware")
    graph = fused(name)                      # before _compare patches the reference's routing
    for seq in (7, 33):
        rel = _compare(art, graph, seq, monkeypatch)
        assert rel <= TOL, f"{name} seq {seq}: max diff {rel:.3g} x max|logit| > {TOL}"


@pytest.mark.parametrize("name", ["llama_a", "mixtral_a", "qwen3_moe_a", "deepseek_v3_a", "deepseek_v4_a"])
def test_bf16_emulated_logits_match_the_reference(name, tmp_path, monkeypatch):
    check(name, tmp_path, monkeypatch)


def test_bf16_decode_through_bf16_paged_caches(tmp_path):
    """Teacher-forced decode through prefill.onnx / decode.onnx with bfloat16 paged caches."""
    art = build("llama_a", tmp_path, generation=True)
    s = polyport.load(art, "ascend")
    assert s.entry["paged_cache"]["dtype"] == "bfloat16"
    assert {a.dtype.name for a in s.new_cache(1, 16).arrays.values()} == {"bfloat16"}
    ids = np.random.default_rng(3).integers(0, corpus()["llama_a"]["vocab_size"], size=(1, 20), dtype=np.int64)
    want = next(iter(ReferenceSession(import_onnx(model_path("llama_a"))).run({"input_ids": ids}).values()))[0]
    state = s.start(ids[:, :7])
    assert state.cached
    assert_logits_close(state.logits[0], want[6], rel=TOL)
    for t in range(7, 19):
        assert_logits_close(state.append(ids[:, t])[0], want[t], rel=TOL)

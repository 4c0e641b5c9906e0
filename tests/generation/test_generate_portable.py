"""Generation through the GPU kernels, without a GPU: the portable kernel set's prefill/decode.

The cuda/rocm targets build the derived programs from the portable kernels (kernels/portable/:
the flash-decoding CachedAttention, CacheUpdate in place, TE attention and MoE). Their loops are
bound to GPU threads there and serial here, where the cpu target builds the very same kernels
for LLVM. That library is laid out as a cuda artifact (cuda/sm_90/model.so, the entry listing
the programs) and loaded through runtime/gpu_session.py with the device query patched to report
an sm_90 GPU that is tvm.cpu(): the GPU session's generation path, from the manifest's programs
to the in-place cache buffers, runs exactly as on a GPU except for the device code.

Checked: teacher-forced decode within 1e-4 x max|logit| of ORT's full forward (issue 11's rule),
greedy tokens equal to the reference executor's, and the cache buffers updated in place. llama_a
is slow (one ~30 s build); the MLA, shared-K=V and sinks + sliding-window exports are `corpus`
(a build each, up to 90 s here)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import polyport
from polyport.compiler import signature
from polyport.frontend.onnx_import import import_onnx
from polyport.passes.derive_generation import derive_generation, generation_entry
from polyport.passes.pipelines import run_pipeline
from polyport.runtime import gpu_session
from polyport.runtime.artifact import ArtifactWriter
from polyport.runtime.cost import manifest_cost
from polyport.targets.base import CompileOptions, get_target

from .conftest import assert_decodes_like, generator, ort_logits, path_of, prompt
from .test_generate_cpu import _address

STEPS = 12
# absorbed MLA; shared K=V + sinks; sinks + ring + biased MoE; soft-capped scores; sparsemixer routing;
# CSA + HCA caches
CORPUS = ["deepseek_v3_a", "deepseek_v4_a", "gpt_oss_a", "gemma2_a", "phimoe_a", "deepseek_v4_b"]


@functools.lru_cache(maxsize=None)
def cuda_layout_artifact(name: str) -> Path:
    """`name` built by the cpu target with the portable kernels, laid out as a cuda sm_90 artifact."""
    graph = import_onnx(path_of(name))
    run_pipeline(graph, "default")
    programs = derive_generation(graph)
    assert not programs.uncached, programs.uncached
    weights = {v.name: v.const for v in graph.constants.values()}
    weights.update(programs.added_constants())
    tmp = tempfile.mkdtemp(prefix=f"polyport_gen_portable_{name}_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    with ArtifactWriter(Path(tmp) / "art", signature(graph, name)) as w:
        w.write_weights(weights)
        w.manifest["cost"] = manifest_cost(graph)
        w.manifest["generation"] = generation_entry(graph, programs)
        d = w.target_dir("cuda")
        entry = get_target("cpu").lower(graph, d, weights, CompileOptions(extra={"kernels": "portable"}),
                                        programs=programs)
        assert entry["programs"] == ["prefill", "decode"]
        (d / "sm_90").mkdir()
        (d / "model.so").rename(d / "sm_90" / "model.so")
        w.add_target("cuda", {"archs": ["sm_90"], "libraries": {"sm_90": "cuda/sm_90/model.so"},
                              "meta": "cuda/model.json", "files": ["cuda/model.json", "cuda/sm_90/model.so"],
                              "programs": entry["programs"], "toolchain": {}, "kernels": {"sm_90": []}})
        return w.commit()


@pytest.fixture
def fake_sm90(monkeypatch):
    import tvm
    monkeypatch.setattr(gpu_session, "device_problem", lambda target, device_id=0: None)
    monkeypatch.setattr(gpu_session, "open_device", lambda target, device_id=0: (tvm.cpu(), "Fake GPU", "sm_90"))


def teacher_forced(s, name: str, n: int) -> None:
    ids = prompt(name, n, STEPS)
    want = ort_logits(name, ids)[0]
    g = assert_decodes_like(s, ids, n, want)
    assert g.cached, "the GPU session recomputed instead of decoding through its cache"


def check(name: str) -> None:
    s = polyport.load(cuda_layout_artifact(name), target="cuda")
    assert isinstance(s, gpu_session.GpuSession) and s.arch == "sm_90"
    for n in (1, 7, 40):
        teacher_forced(s, name, n)


@pytest.mark.slow
def test_gpu_session_decodes_llama_through_the_portable_kernels(fake_sm90):
    check("llama_a")
    s = polyport.load(cuda_layout_artifact("llama_a"), target="cuda")
    ids = prompt("llama_a", 5)
    np.testing.assert_array_equal(s.generate(ids, 10), generator("llama_a").generate(ids, 10))
    cache = s.new_cache(1, 16)
    before = {n: _address(t) for n, t in cache.items()}
    s.run_program("prefill", {"input_ids": ids, "lengths": np.array([5])}, cache)
    s.run_program("decode", {"input_ids": ids[:, :1], "past_len": np.array([5])}, cache)
    assert {n: _address(t) for n, t in cache.items()} == before       # updated in place, as on the device


@pytest.mark.corpus
@pytest.mark.parametrize("name", CORPUS)
def test_gpu_session_decodes_through_the_portable_kernels(name, fake_sm90):
    check(name)

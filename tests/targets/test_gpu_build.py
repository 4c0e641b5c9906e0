"""The cuda and rocm targets' builds: device code per architecture for every corpus export
(five named exports by default, the rest `slow`; known gaps are strict xfails in tests/families.py).

What is checked (no GPU here): TVM reads each model.so's packed modules up to
the device module, whose loader this CUDA/ROCm-less TVM lacks; and each arch's
model.so embeds device code for THAT arch — for cuda an nvcc fatbin whose sm_XX cubin lists, as ENTRY functions
(cuobjdump), exactly the kernels the built module calls, plus compute_XX PTX;
for rocm an HSACO whose amdhsa.target is the arch and whose `.kd` kernel
descriptors are exactly those kernels. The kernel names come from the built
module's own function table, never from a list written here. A model whose
attention can be cached also carries the derived prefill/decode programs
(manifest `programs`, model.json `functions`) and the decode kernels in each
arch's device code: checked for llama_a by default and for every `corpus` build
(the others build the cache-less program only, to bound CI's time). Not checked:
numerics on a GPU (the kernels' numerics are checked on the CPU: test_cache_kernels.py,
generation/test_generate_portable.py).

One compile per (model, target): the builds spread over xdist workers. Without
nvcc / cuobjdump, or without rocm-device-libs / lld >= 19, the target's tests
skip and say which tool is missing; with POLYPORT_REQUIRE_GPU_TOOLCHAINS=1 (CI)
they fail instead. scripts/install_gpu_toolchains.sh installs them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from polyport import errors
from polyport.compiler import compile_model
from polyport.targets import device_code, rocm
from polyport.targets.base import CompileOptions, get_target
from polyport.targets.cuda import find_nvcc

from .. import families
from ..real_models import corpus

MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"
NAMED_EXPORTS = ["llama_a", "mixtral_a", "qwen3_moe_a", "deepseek_v3_a", "deepseek_v4_a"]   # run by default
DECODE_EXPORT = "llama_a"           # the default export whose build includes the derived prefill/decode
EXPORTS = sorted(corpus())
REQUIRED = os.environ.get("POLYPORT_REQUIRE_GPU_TOOLCHAINS") == "1"


def _missing(target: str) -> str | None:
    """Why `target` cannot be built and inspected here, or None."""
    if target == "cuda":
        if find_nvcc() is None:
            return "nvcc is not installed"
        if device_code.find_cuobjdump() is None:
            return "cuobjdump is not installed (pip nvidia-cuda-cuobjdump)"
        return None
    try:
        get_target("rocm").check_toolchain()
    except errors.ToolchainError as e:
        return str(e)
    return None


def _require(target: str) -> None:
    why = _missing(target)
    if why:
        msg = f"{target} toolchain missing: {why}; run scripts/install_gpu_toolchains.sh"
        pytest.fail(msg) if REQUIRED else pytest.skip(msg)


def _build(model: str, target: str, default_archs: tuple[str, ...], tmp_path: Path):
    """Compile `model` for `target` with its default archs; check the manifest entry; return (artifact, entry)."""
    _require(target)
    out = tmp_path / model
    compile_model(MODELS / f"{model}.onnx", [target], out,
                  generation=_with_programs(model))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["targets"][target]
    assert entry["archs"] == list(default_archs)
    assert entry["libraries"] == {a: f"{target}/{a}/model.so" for a in default_archs}
    assert set(entry["files"]) == {f"{target}/model.json", *entry["libraries"].values()}
    assert set(entry["files"]) <= set(manifest["files"])               # hashed like every artifact file
    meta = json.loads((out / entry["meta"]).read_text())
    assert meta["packed"] == {} and meta["inputs"] == [i["name"] for i in manifest["model"]["inputs"]]
    _check_programs(manifest, entry, meta)
    return out, entry


def _with_programs(model: str) -> bool:
    """Whether this build includes `model`'s prefill/decode: they add about a third to a build, so CI
    (the default and slow steps) builds them for DECODE_EXPORT only, `-m corpus` for every export it builds."""
    return model == DECODE_EXPORT or any(m.name == "corpus" for m in families.marks(model, "cuda",
                                                                                  default=NAMED_EXPORTS))


# the decode kernels (kernels/portable/cached_attention.py, cache_update.py) as the device code names them
DECODE_KERNELS = {"cached_attention_partial_kernel", "cached_attention_merge_kernel", "cache_update_kernel"}


def _check_programs(manifest: dict, entry: dict, meta: dict) -> None:
    """A model whose every attention can be cached has prefill and decode in every arch's library, with the
    decode kernels in its device code; one that cannot has neither (its GPU session recomputes)."""
    generation = manifest["generation"]
    if generation["uncached"] or not generation["layers"] or not _with_programs(manifest["model"]["name"]):
        assert "programs" not in entry and "functions" not in meta
        return
    assert entry["programs"] == ["prefill", "decode"]
    assert set(meta["functions"]) == {"prefill", "decode"}
    compressed_only = all(layer["kind"] in ("hca", "csa") for layer in generation["layers"])   # deepseek_v4_d
    for arch, names in entry["kernels"].items():
        want = {"cache_update_kernel"} if compressed_only else DECODE_KERNELS     # CSA/HCA decode with Attention
        assert want <= set(names), f"{arch}: no decode kernels among {sorted(names)}"
        # MoE: the decode program's few-token GEMVs, but for biased experts (gpt-oss), which keep the TE compute
        biased = corpus().get(manifest["model"]["name"], {}).get("family") == "gpt_oss"
        if any(n.startswith("moe_experts") for n in names) and not biased:
            assert {"moe_gate_up_gemv_kernel", "moe_down_gemv_kernel"} <= set(names), sorted(names)


def _device_module(path: Path, kind: str) -> device_code.DeviceModule:
    mods = device_code.device_modules(device_code.library_bin_from_so(path))
    assert [m.kind for m in mods] == [kind], f"{path}: device modules {[m.kind for m in mods]}"
    _loads_up_to_the_device_runtime(path, kind)
    return mods[0]


def _loads_up_to_the_device_runtime(path: Path, kind: str) -> None:
    """TVM here (no CUDA / ROCm runtime) reads the packed library, the VM executable first, and stops only at the
    device module, for want of its loader: the (rewritten) blob is well formed."""
    import tvm
    import tvm_ffi
    if tvm_ffi.get_global_func(f"ffi.Module.load_from_bytes.{kind}", allow_missing=True) is not None:
        return                                    # a GPU-enabled TVM: loading needs the device itself
    with pytest.raises(RuntimeError, match=rf"created using \{{{kind}\}} but a loader of that name is not registered"):
        tvm.runtime.load_module(str(path))


@pytest.mark.parametrize("model", families.params(EXPORTS, "cuda", default=NAMED_EXPORTS,
                                                   raises=errors.UnsupportedOpError))
def test_cuda_device_code_per_arch(model, tmp_path):
    out, entry = _build(model, "cuda", ("sm_80", "sm_90"), tmp_path)
    assert "nvcc" in entry["toolchain"]
    for arch, lib in entry["libraries"].items():
        dev = _device_module(out / lib, "cuda")
        assert dev.fmt == "fatbin" and dev.kernels
        listed = device_code.cubin_kernels(dev.code)
        num = arch[3:]
        assert set(listed) == {arch, f"compute_{num}"}, f"{lib}: fatbin holds {sorted(listed)}"
        assert sorted(listed[arch]) == sorted(dev.kernels) == entry["kernels"][arch]


@pytest.mark.parametrize("model", families.params(EXPORTS, "rocm", default=NAMED_EXPORTS,
                                                   raises=errors.UnsupportedOpError))
def test_rocm_device_code_per_arch(model, tmp_path):
    out, entry = _build(model, "rocm", ("gfx90a", "gfx942"), tmp_path)
    assert {"llvm", "lld"} <= set(entry["toolchain"])
    for arch, lib in entry["libraries"].items():
        dev = _device_module(out / lib, "hip")
        assert dev.fmt == "hsaco" and dev.kernels
        assert device_code.hsaco_kernels(dev.code) == {arch: sorted(dev.kernels)}
        assert sorted(dev.kernels) == entry["kernels"][arch]


def test_arch_selection():
    cuda, rocm_t = get_target("cuda"), get_target("rocm")
    assert cuda.select_archs(CompileOptions()) == ("sm_80", "sm_90")
    mixed = CompileOptions(archs=("sm_90", "gfx942", "sm_90"))          # one --arch list for both targets
    assert cuda.select_archs(mixed) == ("sm_90",)
    assert rocm_t.select_archs(mixed) == ("gfx942",)
    assert rocm_t.select_archs(CompileOptions(archs=("sm_80",))) == ("gfx90a", "gfx942")


def test_cli_arch_selects_what_is_built(cli, tmp_path):
    """`compile --arch` with targets of both families: each builds only its own archs (a non-default one here)."""
    _require("cuda")
    _require("rocm")
    out = tmp_path / "a"
    r = cli("compile", str(MODELS / "llama_a.onnx"), "--target", "cuda", "--target", "rocm",
            "--arch", "sm_86", "--arch", "gfx942", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    targets = json.loads((out / "manifest.json").read_text())["targets"]
    assert targets["cuda"]["archs"] == ["sm_86"] and targets["rocm"]["archs"] == ["gfx942"]
    fatbin = _device_module(out / "cuda/sm_86/model.so", "cuda").code
    assert set(device_code.cubin_kernels(fatbin)) == {"sm_86", "compute_86"}
    hsaco = _device_module(out / "rocm/gfx942/model.so", "hip").code
    assert list(device_code.hsaco_kernels(hsaco)) == ["gfx942"]


def test_unknown_arch_is_a_clear_error(cli, tmp_path):
    with pytest.raises(errors.PolyportError, match=r"cuda target: unknown arch 'sm_13'; known archs: cuda: .*sm_90"):
        get_target("cuda").select_archs(CompileOptions(archs=("sm_13",)))
    r = cli("compile", str(MODELS / "llama_a.onnx"), "--target", "rocm", "--arch", "gfx9000", "-o", str(tmp_path / "a"))
    assert r.exit_code == 2 and "unknown arch 'gfx9000'" in r.stderr


def test_missing_toolchains_say_what_to_install(monkeypatch):
    import polyport.targets.cuda as cuda_mod
    monkeypatch.setattr(cuda_mod, "find_nvcc", lambda: None)
    with pytest.raises(errors.ToolchainError, match="nvcc not found"):
        get_target("cuda").check_toolchain()
    monkeypatch.setattr(rocm, "find_bitcode_dir", lambda: None)
    with pytest.raises(errors.ToolchainError, match="rocm-device-libs is missing"):
        get_target("rocm").check_toolchain()
    monkeypatch.setattr(rocm, "find_bitcode_dir", lambda: Path("/usr/lib/x86_64-linux-gnu/amdgcn/bitcode"))
    monkeypatch.setattr(rocm, "find_lld", lambda: None)
    with pytest.raises(errors.ToolchainError, match=r"no ld.lld >= 19 .*lld 14 rejects"):
        get_target("rocm").check_toolchain()


def test_a_kernel_no_gpu_rule_schedules_is_named(monkeypatch):
    """With no rule to apply, the error names each kernel, its blocks and, for fused ops, the model nodes."""
    import tvm
    from polyport.frontend.onnx_import import import_onnx
    from polyport.passes.pipelines import run_pipeline
    from polyport.targets import schedule_gpu
    from polyport.targets.tvm_lower import lower_to_relax
    graph = import_onnx(MODELS / "llama_a.onnx")
    run_pipeline(graph, "default")
    mlp = next(n.name for n in graph.nodes if n.qualified_op == "polyport::GatedMLP")
    monkeypatch.setattr(schedule_gpu, "gpu_rules", lambda: ())
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with pytest.raises(errors.UnsupportedOpError) as e:
        schedule_gpu.schedule_module(lower_to_relax(graph, "cuda", kernels="portable").mod, target, "cuda", graph)
    assert "cuda target (sm_90): no GPU schedule applies to kernel(s) " in str(e.value)
    assert f"gated_mlp_down (blocks: matmul, from node(s) {mlp}" in str(e.value)
    assert "cached_attention" not in str(e.value)         # kernels that bind their own threads need no rule

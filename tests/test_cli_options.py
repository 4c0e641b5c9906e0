"""Options that do not apply are refused, naming why; help and warnings read as a user expects."""
from __future__ import annotations

import os

import pytest

from polyport import diagnostics, errors
from polyport.compiler import compile_model

from .real_models import model_path

LLAMA = model_path("llama_a")
ORDER = "cpu, cuda, rocm, ascend"


@pytest.mark.parametrize("flags,named", [
    (["--passes", "default"], "--passes"),
    (["--explain"], "--explain"),
    (["--dump-ir", "ir.txt"], "--dump-ir"),
])
def test_run_artifact_refuses_model_options(cli, llama_artifact, tmp_path, monkeypatch, flags, named):
    monkeypatch.chdir(tmp_path)
    r = cli("run", llama_artifact, "--seq", "2", *flags)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"polyport: error: {named} applies to an ONNX model; {llama_artifact} is a "
                               "compiled artifact")
    assert not (tmp_path / "ir.txt").exists()


@pytest.mark.parametrize("targets,arch,says", [
    (["cuda"], "gfx942", "--arch gfx942 is a rocm architecture; it does not apply to --target cuda"),
    (["cpu"], "sm_90", "--arch sm_90 is a cuda architecture; it does not apply to --target cpu"),
    (["cpu"], "znver4", "--arch znver4 is not an architecture of --target cpu (cpu builds for this machine's CPU"),
    (["ascend"], "gfx90a", "--arch gfx90a is a rocm architecture; it does not apply to --target ascend"),
])
def test_arch_that_no_target_takes_is_refused(cli, tmp_path, targets, arch, says):
    args = [a for t in targets for a in ("--target", t)]
    r = cli("compile", LLAMA, *args, "--arch", arch, "-o", tmp_path / "art")
    assert r.exit_code == 2 and r.stderr.startswith(f"polyport: error: {says}"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_arch_of_one_target_among_several_is_taken(tmp_path):
    art = compile_model(LLAMA, ["ascend"], tmp_path / "art", options=_options(archs=("Ascend910B3",)))
    assert (art / "manifest.json").is_file()


def _options(**kw):
    from polyport.targets.base import CompileOptions
    return CompileOptions(**kw)


def test_no_arguments_prints_the_usage(cli):
    r = cli()
    lines = r.stderr.splitlines()
    assert lines[0] == "Usage: polyport [OPTIONS] COMMAND [ARGS]..." and "Commands:" in lines
    assert "polyport: error" not in r.stderr


def test_targets_listed_in_one_order(tmp_path):
    from polyport.runtime import bench
    from polyport.runtime.session import load
    from polyport.targets.base import get_target, target_names
    assert ", ".join(target_names()) == ORDER
    for call in (lambda: get_target("tpu"), lambda: load(tmp_path, "tpu"), lambda: bench.plan(["cpu"], ["tpu"], None)):
        with pytest.raises(errors.PolyportError, match=f"unknown target 'tpu'; known: {ORDER}$"):
            call()


def test_compile_warnings_are_one_summary_line(cli, tmp_path):
    r = cli("compile", model_path("deepseek_v3_a"), "--target", "ascend", "-o", tmp_path / "art")
    assert r.exit_code == 0
    lines = r.stderr.splitlines()
    assert all(line.startswith("polyport: ") for line in lines), r.stderr        # no raw warnings.warn output
    # 3 MLA layers x (v padding in main and in prefill, decode's [latent ; rope] key: the dims are not 512 + 64)
    assert len([line for line in lines if line.startswith("polyport: ascend: 9 warnings")]) == 1


def test_native_warnings_are_captured():
    """TVM's C++ LOG(WARNING) lines (rocm: one per kernel) are collected; other native output passes through."""
    with diagnostics.captured() as found:
        for _ in range(3):
            os.write(2, b"[15:50:25] /src/codegen_amdgpu.cc:78: Warning: Cannot get maximum number of threads\n")
    assert found == ["Cannot get maximum number of threads"] * 3
    assert diagnostics.summary("rocm", found) == "rocm: 3 warnings, e.g. Cannot get maximum number of threads"


@pytest.mark.parametrize("flags,says", [
    (["--quantize-lm-head"], "--quantize-lm-head needs --quantize"),
    (["--quantize-embeddings"], "--quantize-embeddings needs --quantize or --dtype bf16|f16"),
])
def test_quantize_options_need_a_scheme(cli, tmp_path, flags, says):
    r = cli("compile", LLAMA, "-t", "cpu", "-o", tmp_path / "art", *flags)
    assert r.exit_code == 2 and says in r.stderr, r.stderr
    assert not (tmp_path / "art").exists()

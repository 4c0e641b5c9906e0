"""The cuda/rocm loader (runtime/gpu_session.py) without a GPU.

- `select_arch` and the device-attribute decoders are pure: every rule is tested here.
- `polyport.load(ART, "cuda")` on a machine without a usable GPU is one clear error naming the
  target and the architectures built; the CLI turns it into exit status 2.
- With the device query patched to report a GPU, loading picks the library for its arch and runs
  it. The "GPU" is tvm.cpu() and the per-arch library a cpu build placed where the cuda contract
  puts it (`cuda/<arch>/model.so`, `cuda/model.json`, manifest `archs`/`libraries`), which
  exercises everything but the device code. Once the cuda target compiles here, `gpu_artifact`
  can call `compile_model(..., ["cuda"], ...)` instead for the no-device tests.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from polyport import errors
from polyport.compiler import signature
from polyport.ir import dtypes
from polyport.ir.graph import Graph
from polyport.ir.symbolic import sym
from polyport.ir.types import TensorType
from polyport.runtime import gpu_session
from polyport.runtime import session as sessionmod
from polyport.runtime.artifact import ArtifactError, ArtifactWriter
from polyport.runtime.cost import graph_cost
from polyport.runtime.gpu_session import cuda_arch, rocm_arch, select_arch

F32 = dtypes.F32
W = np.linspace(-1.0, 1.0, 16, dtype=np.float32)


# ---- pure arch selection ------------------------------------------------------------------
@pytest.mark.parametrize("built, device, chosen", [
    (["sm_80", "sm_90"], "sm_90", "sm_90"),          # exact
    (["sm_80", "sm_90"], "sm_86", "sm_80"),          # a cubin runs on later minors of its major
    (["sm_80", "sm_86", "sm_90"], "sm_89", "sm_86"),  # the highest minor not above the device's
    (["sm_90a", "sm_90"], "sm_90", "sm_90"),         # plain preferred to arch-specific
    (["sm_90a"], "sm_90", "sm_90a"),                 # arch-specific fits its exact arch
    (["sm_90", "sm_100"], "sm_100", "sm_100"),       # two-digit majors
    (["sm_100", "sm_120"], "sm_121", "sm_120"),
])
def test_select_cuda_arch(built, device, chosen):
    assert select_arch("cuda", built, device) == chosen


@pytest.mark.parametrize("built, device", [
    (["sm_80", "sm_90"], "sm_75"),                   # older major: no cubin runs
    (["sm_80", "sm_90"], "sm_100"),                  # newer major: cubins do not run forward across majors
    (["sm_90"], "sm_89"),                            # same family number, lower major
    (["sm_90a"], "sm_91"),                           # an `a` cubin runs on its exact arch only
])
def test_select_cuda_arch_refuses_with_both_sides_named(built, device):
    with pytest.raises(errors.PolyportError) as e:
        select_arch("cuda", built, device)
    msg = str(e.value)
    assert f"this device is {device}" in msg and ", ".join(built) in msg and f"--arch {device}" in msg


def test_select_rocm_arch():
    assert select_arch("rocm", ["gfx90a", "gfx942"], "gfx942") == "gfx942"
    assert select_arch("rocm", ["gfx90a", "gfx942"], "gfx90a:sramecc+:xnack-") == "gfx90a"
    with pytest.raises(errors.PolyportError, match=r"this device is gfx1100 .*gfx90a, gfx942"):
        select_arch("rocm", ["gfx90a", "gfx942"], "gfx1100")       # HSACO is exact-arch only
    with pytest.raises(errors.PolyportError, match="not a CUDA architecture"):
        select_arch("cuda", ["gfx942"], "sm_90")


def test_device_attribute_decoding():
    assert cuda_arch("9.0") == "sm_90" and cuda_arch("8.6") == "sm_86" and cuda_arch("12.0") == "sm_120"
    # HIP's gcnArch integer: major*100 + minor*10 + stepping (hex digit); the compute version disambiguates
    assert rocm_arch(910, "9.0") == "gfx90a"
    assert rocm_arch(942, "9.4") == "gfx942"
    assert rocm_arch(1100, "11.0") == "gfx1100"
    assert rocm_arch("gfx942:sramecc+:xnack-") == "gfx942"


# ---- artifacts following the cuda/rocm contract -------------------------------------------
def tiny_graph() -> Graph:
    """y = x * w (no MatMul, so the cpu build binds weights as stored, like a GPU build)."""
    g = Graph()
    g.opset_imports[""] = 21
    x = g.add_input("x", TensorType(F32, (1, sym("seq"), 16)))
    w = g.add_constant("w", W)
    y = g.make_node("Mul", [x, w], types=[TensorType(F32, (1, sym("seq"), 16))])
    g.set_outputs(y.outputs)
    return g


def gpu_artifact(path, target: str, archs: tuple[str, ...], runnable: bool = False):
    """An artifact whose `target` entry follows the gpubuild contract.

    runnable=False: each library is placeholder bytes (the no-device checks never open it);
    runnable=True: each is a cpu build of tiny_graph, run by patching the device to tvm.cpu()."""
    graph = tiny_graph()
    with ArtifactWriter(path, signature(graph, "tiny")) as w:
        w.write_weights({"w": W})
        w.manifest["cost"] = graph_cost(graph)
        d = w.target_dir(target)
        if runnable:
            from polyport.targets.base import CompileOptions, get_target
            get_target("cpu").lower(graph, d, {"w": W}, CompileOptions())
            meta = json.loads((d / "model.json").read_text())
            assert not meta["packed"], meta          # GPU builds bind weights as stored
        else:
            (d / "model.so").write_bytes(b"not a library")
            (d / "model.json").write_text(json.dumps({"function": "main", "inputs": ["x"], "params": ["w"],
                                                      "outputs": [graph.outputs[0].name], "symbols": ["seq"],
                                                      "packed": {}}))
        libraries = {}
        for arch in archs:
            (d / arch).mkdir()
            shutil.copy(d / "model.so", d / arch / "model.so")
            libraries[arch] = f"{target}/{arch}/model.so"
        (d / "model.so").unlink()
        w.add_target(target, {"archs": list(archs), "libraries": libraries, "meta": f"{target}/model.json",
                              "files": sorted(libraries.values()) + [f"{target}/model.json"],
                              "toolchain": {}, "kernels": {a: [] for a in archs}, "compile_seconds": 0.0})
        return w.commit()


def _gpu_visible(target: str) -> bool:
    return gpu_session.device_problem(target) is None


@pytest.mark.parametrize("target, archs", [("cuda", ("sm_80", "sm_90")), ("rocm", ("gfx90a", "gfx942"))])
def test_load_without_device_is_a_clear_error(tmp_path, target, archs):
    if _gpu_visible(target):
        pytest.skip(f"a {target} device is visible here")
    art = gpu_artifact(tmp_path / "art", target, archs)
    vendor = {"cuda": "CUDA", "rocm": "ROCm"}[target]
    with pytest.raises(errors.PolyportError) as e:
        sessionmod.load(art, target)
    msg = str(e.value)
    assert msg.startswith(f"target {target}: no {vendor} device is visible to TVM on this machine")
    assert msg.endswith(f"this artifact holds device code for {', '.join(archs)}")


def test_cli_run_without_device_exits_2(tmp_path, cli):
    if _gpu_visible("cuda"):
        pytest.skip("a CUDA device is visible here")
    art = gpu_artifact(tmp_path / "art", "cuda", ("sm_80", "sm_90"))
    r = cli("run", art, "--target", "cuda", "--seq", "2")
    assert r.exit_code == 2
    assert r.stderr.startswith("polyport: error: target cuda: no CUDA device is visible to TVM")
    assert "sm_80, sm_90" in r.stderr and "Traceback" not in r.stderr


def test_cli_generate_without_device_exits_2(tmp_path, cli):
    """The GPU session's generation path goes as far as the device: then one line, exit 2."""
    if _gpu_visible("rocm"):
        pytest.skip("a ROCm device is visible here")
    art = gpu_artifact(tmp_path / "art", "rocm", ("gfx90a", "gfx942"))
    r = cli("generate", art, "--target", "rocm", "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("polyport: error: target rocm: no ROCm device is visible to TVM")
    assert r.stderr.rstrip().endswith("this artifact holds device code for gfx90a, gfx942")
    assert len(r.stderr.strip().splitlines()) == 1


def test_entry_without_libraries_refused(tmp_path):
    art = gpu_artifact(tmp_path / "art", "cuda", ("sm_90",))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["targets"]["cuda"]["libraries"] = {}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="cuda entry of the manifest lists no archs/libraries"):
        sessionmod.load(art, "cuda")


# ---- a GPU reported present: library choice and the run, on tvm.cpu() ----------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """Make gpu_session see one device of the arch set on the returned dict (default sm_90)."""
    import tvm
    state = {"arch": "sm_90", "opened": 0}

    def open_device(target, device_id=0):
        state["opened"] += 1
        return tvm.cpu(), "Fake GPU", state["arch"]

    monkeypatch.setattr(gpu_session, "device_problem", lambda target, device_id=0: None)
    monkeypatch.setattr(gpu_session, "open_device", open_device)
    return state


@pytest.fixture(scope="module")
def runnable_art(tmp_path_factory):
    return gpu_artifact(tmp_path_factory.mktemp("gpu") / "art", "cuda", ("sm_80", "sm_90"), runnable=True)


def test_load_picks_the_library_for_the_device_arch_and_runs(runnable_art, fake_gpu):
    s = sessionmod.load(runnable_art, "cuda")
    assert (s.arch, s.library, s.device_name) == ("sm_90", "cuda/sm_90/model.so", "Fake GPU")
    x = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    out = s.run({"x": x})
    np.testing.assert_allclose(out[s.output_names[0]], x * W, rtol=1e-6)
    fake_gpu["arch"] = "sm_86"
    assert sessionmod.load(runnable_art, "cuda").library == "cuda/sm_80/model.so"
    fake_gpu["arch"] = "sm_75"
    with pytest.raises(errors.PolyportError, match="this device is sm_75 but the artifact holds device code "
                                                   "only for sm_80, sm_90"):
        sessionmod.load(runnable_art, "cuda")
    with pytest.raises(errors.InputError, match="dtype"):
        s.run({"x": x.astype(np.float64)})


def test_bench_measures_a_gpu_target_through_the_gpu_session(runnable_art, fake_gpu, monkeypatch):
    from polyport.runtime import bench as benchmod
    monkeypatch.setattr(benchmod, "device_problem", lambda t: None if t in ("cpu", "cuda") else "absent")
    doc = benchmod.bench(runnable_art, targets=["cuda", "rocm"], seqs=(1, 3), runs=2, warmup=1)
    measured = [r for r in doc["rows"] if r["kind"] == "measured"]
    assert [(r["target"], r["device"], r["arch"], r["seq"]) for r in measured] == \
        [("cuda", "Fake GPU", "sm_90", 1), ("cuda", "Fake GPU", "sm_90", 3)]
    assert fake_gpu["opened"] == 1                       # one session serves every length
    estimated = {(r["target"], r["device"]) for r in doc["rows"] if r["kind"] == "estimated"}
    assert estimated == {("rocm", "AMD Instinct MI300X")}      # measured targets get no estimate rows


def test_bench_estimates_an_unusable_gpu_and_says_why(tmp_path, monkeypatch):
    from polyport.runtime import bench as benchmod
    art = gpu_artifact(tmp_path / "art", "cuda", ("sm_90",))
    node = tmp_path / "nvidiactl"                        # the device node exists, TVM cannot drive it
    node.write_text("")
    monkeypatch.setitem(benchmod.GPU_DEVICE_NODES, "cuda", (str(node),))
    monkeypatch.setattr(gpu_session, "device_problem", lambda target, device_id=0: "no CUDA device is visible")
    doc = benchmod.bench(art, seqs=(8,), runs=1, warmup=0)
    kinds = {(r["target"], r["device"], r["kind"]) for r in doc["rows"]}
    assert kinds == {("cuda", "NVIDIA H100 SXM", "estimated"), ("cuda", "NVIDIA H200 SXM", "estimated"),
                     ("rocm", "AMD Instinct MI300X", "estimated"), ("ascend", "Huawei Ascend 910B3", "estimated")}
    assert "cuda: estimated only: no CUDA device is visible" in doc["notes"]


def test_device_problem_names_what_is_missing(monkeypatch):
    import types

    import tvm
    monkeypatch.setattr(tvm.runtime, "enabled", lambda target: True)       # the runtime loads ...
    monkeypatch.setattr(tvm, "cuda", lambda i=0: types.SimpleNamespace(exist=False))   # ... but sees no GPU
    assert gpu_session.device_problem("cuda") == "no CUDA device is visible to TVM on this machine"
    assert gpu_session.device_problem("cuda", 1) == "no CUDA device 1 is visible to TVM on this machine"
    monkeypatch.setattr(tvm, "cuda", lambda i=0: types.SimpleNamespace(exist=True))
    assert gpu_session.device_problem("cuda") is None
    monkeypatch.setattr(tvm.runtime, "enabled", lambda target: False)     # the runtime says why it is off
    assert gpu_session.device_problem("cuda").startswith("no CUDA device is visible to TVM on this machine (")


def test_sessions_run_on_a_runtime_only_tvm(tmp_path):
    """What gpu_bundle.sh ships to a GPU machine: TVM without its compiler library. polyport.load must
    never need the compiler (no tvm.relax), and the GPU session must still be able to ask for a device."""
    import os
    import subprocess
    import sys
    from polyport.targets.base import CompileOptions, get_target
    graph = tiny_graph()
    with ArtifactWriter(tmp_path / "art", signature(graph, "tiny")) as w:
        w.write_weights({"w": W})
        w.add_target("cpu", get_target("cpu").lower(graph, w.target_dir("cpu"), {"w": W}, CompileOptions()))
        art = w.commit()
    code = f"""
import sys, numpy as np, tvm, polyport
from polyport.runtime.gpu_session import device_problem
assert tvm.base._RUNTIME_ONLY
s = polyport.load({str(art)!r}, "cpu")
x = np.ones((1, 3, 16), np.float32)
assert np.allclose(s.run({{"x": x}})[s.output_names[0]], x * np.linspace(-1, 1, 16, dtype=np.float32))
problem = device_problem("cuda")
assert problem is None or problem.startswith("no CUDA device"), problem
bad = [m for m in sys.modules if m.startswith(("tvm.relax", "polyport.targets.tvm_lower", "polyport.passes"))]
assert not bad, bad
"""
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

"""The cpu session's thread policy (runtime/cpu_session.py): TVM never pins the caller's threads,
and its workers stop spinning soon after a call, so other thread pools in the process keep their CPUs.

Each check runs in a fresh interpreter: TVM reads its thread settings once per process (the spin
count) or per thread pool, so pytest's own process would tell nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A parallel TVM kernel, run after `setup`; prints the caller's affinity before and after, that of a
# thread started afterwards, and the process CPU time burned in the 300 ms after each of 3 calls.
PROBE = """
import json, os, resource, sys, threading, time
{setup}
import numpy as np, tvm
from tvm.script import tirx as T
n = 1 << 22
@T.prim_func
def scale(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
    T.func_attr({{"global_symbol": "scale"}})
    for o in T.parallel(64):
        for i in T.serial(n // 64):
            a[o * (n // 64) + i] = b[o * (n // 64) + i] * T.float32(2.0)
f = tvm.compile(tvm.IRModule({{"scale": scale}}), target=tvm.target.Target({{"kind": "llvm"}}))["scale"]
a, b = tvm.runtime.tensor(np.zeros(n, np.float32)), tvm.runtime.tensor(np.ones(n, np.float32))
before = sorted(os.sched_getaffinity(0))
{pin}
f(a, b)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
burned = []
for _ in range(3):
    f(a, b)
    c0 = cpu()
    time.sleep(0.3)
    burned.append((cpu() - c0) * 1e3)
box = {{}}
t = threading.Thread(target=lambda: box.update(a=sorted(os.sched_getaffinity(0))))
t.start(); t.join()
print(json.dumps({{"before": before, "after": sorted(os.sched_getaffinity(0)), "new_thread": box["a"],
                  "burned_ms": sorted(burned)[1]}}))
"""
POLICY = ("import sys; sys.path.insert(0, {pp!r}); from polyport.runtime.cpu_session import _import_tvm; "
          "_import_tvm(2)")
# What TVM does on its own when its pool is configured for CPU 0 (as its default does on machines that
# report core frequencies): the calling thread is pinned to CPU 0.
PIN = 'tvm.get_global_func("runtime.config_threadpool")(-2, 1, ["0"])'


def probe(tmp: Path, setup: str, pin: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}
    env["TVM_NUM_THREADS"] = "2"
    script = tmp / f"probe{len(list(tmp.iterdir()))}.py"     # a file: TVMScript reads the kernel's source
    script.write_text(PROBE.format(setup=setup, pin=pin))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least 2 usable CPUs")


@needs_two_cpus
def test_tvm_alone_pins_the_caller_but_not_under_polyports_policy(tmp_path):
    import polyport
    pp = str(Path(polyport.__file__).parent.parent)
    raw = probe(tmp_path, "", PIN)
    assert raw["after"] == [0] and raw["new_thread"] == [0], raw       # the probe sees what it guards against
    kept = probe(tmp_path, POLICY.format(pp=pp), PIN)
    assert kept["after"] == kept["before"] and kept["new_thread"] == kept["before"], kept


@needs_two_cpus
def test_workers_stop_spinning_soon_after_a_call(tmp_path):
    """TVM's default spin (~150 ms of sched_yield per worker) burned 60-80 ms of CPU after every call on
    a busy machine (on an idle one it can burn next to nothing, so the default is not compared here):
    under polyport's policy the workers burn at most a few ms."""
    import polyport
    pp = str(Path(polyport.__file__).parent.parent)
    policy = probe(tmp_path, POLICY.format(pp=pp))
    assert policy["burned_ms"] < 15, policy


def test_default_threads_are_two_per_cpu():
    """Two TVM threads per usable CPU unless the caller says otherwise (cpu_session.py: a static
    parallel loop then loses a share, not half, of its speed to another pool's spinning thread)."""
    import polyport
    from polyport.devices import usable_cpus
    pp = str(Path(polyport.__file__).parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    code = (f"import os, sys; sys.path.insert(0, {pp!r}); from polyport.runtime import cpu_session as c; "
            "c._import_tvm(None); a = os.environ['TVM_NUM_THREADS']; c._import_tvm(3); "
            "print(a, os.environ['TVM_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(2 * usable_cpus()), "3"]


@pytest.mark.timing
@needs_two_cpus
def test_a_session_beside_ort_keeps_the_callers_affinity_and_does_not_slow_ort(tmp_path):
    """benchmarks/coexist.py on llama_a at seq 512 (its kernels run on TVM's pool there). Marked
    `timing`: beside another test's builds the ratios ran 0.1x to 5x for this code and the last
    stop's alike. Even alone, ratios on a 2-core machine are noisy (in the serial step the median of
    two rounds once read 0.23 after ORT; three reruns passed), so medians of 5 rounds, and only a
    collapse fails: polyport below 35% of its own speed right after ORT or below half of it beside a NumPy thread (the run's explicit 2 threads,
    one per CPU, measured 43-54% and 34-76% under CI-like load; the default two per CPU 73-74% and
    88-92%), or ORT below half its speed after polyport."""
    from polyport.compiler import compile_model
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import engines
    onnx = engines.corpus_path("llama_a")
    compile_model(onnx, ["cpu"], tmp_path / "art", progress=lambda msg: None, generation=False)
    out = engines.run_child({"kind": "coexist", "onnx": str(onnx), "artifact": str(tmp_path / "art"),
                             "threads": 2, "seq": 512, "rounds": 5, "runs": 8})
    assert out["affinity_kept"], out
    assert out["tvm_env"]["TVM_BIND_THREADS"] == "0"
    fractions = {k: v["median"] for k, v in out["fractions"].items()}
    assert fractions["ORT after polyport"] > 0.5, fractions
    assert fractions["polyport after ORT"] > 0.35, fractions
    assert fractions["polyport beside a NumPy thread (50% busy)"] > 0.5, fractions

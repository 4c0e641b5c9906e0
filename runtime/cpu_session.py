"""Loader for the cpu target: the Relax VM (runtime/vm_session.py) over `cpu/model.so` on tvm.cpu().

What is CPU-only lives here: the thread policy and the packed weight layout.

Thread policy (TVM reads these from the environment when a thread's pool starts,
on that thread's first parallel call), so that polyport shares a process with
other thread pools (ONNX Runtime, NumPy/BLAS, a tokenizer) without hurting them:
- `TVM_NUM_THREADS`: two threads per CPU this process may use, unless the user
  set it or passed `threads` (TVM defaults to half the hardware threads: 1 on
  2 vCPUs). TVM cuts each parallel loop statically into one task per thread,
  and the loop ends with its slowest task: when another pool's thread spins on
  one of the CPUs (ONNX Runtime's after each call, OpenBLAS's), the task there
  gets half a CPU, and with one task per CPU every parallel loop ran at half
  speed (43-54% of alone right after an ORT call on llama_a). With two tasks
  per CPU the OS runs the waiting tasks on whichever CPU is free (74%;
  benchmarks/coexist.py).
- `TVM_BIND_THREADS=0`, always: TVM otherwise sets the CPU affinity of the
  calling thread (the caller's own thread, which threads started later
  inherit) and pins its workers to cores, where a busy neighbour on that core
  stalls them. Unpinned, the OS moves them.
- `TVM_THREAD_POOL_SPIN_COUNT=10000`, unless the user set it: after each task
  TVM's workers yield-spin for this many rounds before sleeping. TVM's default
  (300000, ~150 ms) burned 60-80 ms of CPU after every call on a 2-vCPU
  machine, taken from whatever ran next; 10000 burns ~2 ms (benchmarks/coexist.py)
  and still covers the short serial gaps between kernels inside one run.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from ..devices import usable_cpus
from .artifact import Artifact
from .generation import Generator
from .vm_session import VmSession


def _pack(w: np.ndarray, nb: int) -> np.ndarray:
    """[.., K, N] -> [.., N/NB, K, NB] (the dense and per-head kernels' layout; one copy at load time), or as is."""
    if not nb:
        return w
    *lead, k, n = w.shape
    return np.moveaxis(w.reshape(*lead, k, n // nb, nb), -2, -3)


THREAD_POOL_SPIN_COUNT = 10000
THREADS_PER_CPU = 2


def _import_tvm(threads: Optional[int]):
    """TVM, with the thread policy above in the environment before any of its pools starts."""
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(THREADS_PER_CPU * usable_cpus()))
    os.environ["TVM_BIND_THREADS"] = "0"
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(THREAD_POOL_SPIN_COUNT))
    import tvm
    return tvm


class CpuSession(VmSession, Generator):
    def __init__(self, art: Artifact, entry: Mapping[str, Any], threads: Optional[int] = None):
        tvm = _import_tvm(threads)
        self.entry = dict(entry)
        super().__init__(art, "cpu", entry.get("library", "cpu/model.so"), entry.get("meta", "cpu/model.json"),
                         tvm.cpu())

    @classmethod
    def from_executable(cls, executable: Any, meta: Mapping[str, Any], weights: Mapping[str, np.ndarray],
                        signature: Mapping[str, Any], threads: Optional[int] = None) -> "CpuSession":
        """A session over a build still in memory (`CpuTarget.build`), without writing an artifact."""
        tvm = _import_tvm(threads)
        self = cls.in_memory("cpu", executable, meta, weights, signature, tvm.cpu())
        self.entry = {}
        return self

    def prepare(self, name: str, w: np.ndarray) -> np.ndarray:
        rows = self.meta.get("packed_rows", {}).get(name, 0)
        if rows:            # a quantized operand [N, X]: its codes column-blocked, still codes
            return _pack(w.T, rows)
        return _pack(w, self.meta.get("packed", {}).get(name, 0))


def load(art: Artifact, entry: Mapping[str, Any], target: str = "cpu", threads: Optional[int] = None) -> CpuSession:
    return CpuSession(art, entry, threads=threads)

"""Loader for the cpu target: the Relax VM (runtime/vm_session.py) over `cpu/model.so` on tvm.cpu().

What is CPU-only lives here: the thread count and the packed weight layout.
`TVM_NUM_THREADS` is set to the CPU count this process may use before TVM
starts its thread pool, unless the user set it (TVM defaults to half the
hardware threads: 1 on 2 vCPUs).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from .artifact import Artifact
from .generation import Generator
from .vm_session import VmSession


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), which thread pools should size to."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pack(w: np.ndarray, nb: int) -> np.ndarray:
    """[K, N] -> [N/NB, K, NB] (the dense kernel's layout; one copy at load time), or as is."""
    if not nb:
        return w
    k, n = w.shape
    return w.reshape(k, n // nb, nb).transpose(1, 0, 2)


def _import_tvm(threads: Optional[int]):
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(usable_cpus()))
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

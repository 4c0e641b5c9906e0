"""Loader for the cpu target: the Relax VM over `cpu/model.so`, weights bound once from the artifact.

Imports TVM's runtime only (never the compiler). `TVM_NUM_THREADS` is set to
the CPU count this process may use before TVM starts its thread pool, unless
the user set it (TVM defaults to half the hardware threads: 1 on 2 vCPUs).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from .. import errors
from .artifact import Artifact, ArtifactError
from .reference import check_feeds


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), which thread pools should size to."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _pack(w: np.ndarray, nb: int) -> np.ndarray:
    """[K, N] -> [N/NB, K, NB] (the dense kernel's layout; one copy at load time), or as is."""
    if not nb:
        return np.ascontiguousarray(w)
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // nb, nb).transpose(1, 0, 2))


def _import_tvm(threads: Optional[int]):
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(usable_cpus()))
    import tvm
    from tvm import relax  # noqa: F401
    return tvm


class CpuSession:
    def __init__(self, art: Artifact, entry: Mapping[str, Any], threads: Optional[int] = None):
        tvm = _import_tvm(threads)
        self.artifact = art
        self.entry = dict(entry)
        lib_path = art.path / entry.get("library", "cpu/model.so")
        meta_path = art.path / entry.get("meta", "cpu/model.json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{art.path}: cannot read {meta_path.name}: {e}") from None
        try:
            lib = tvm.runtime.load_module(str(lib_path))
        except Exception as e:
            raise ArtifactError(f"{art.path}: cannot load {lib_path.name}: {str(e).splitlines()[0]}") from None
        self._bind(lib, meta, art.weights(), art.signature, f"{art.path}: weights.safetensors")

    @classmethod
    def from_executable(cls, executable: Any, meta: Mapping[str, Any], weights: Mapping[str, np.ndarray],
                        signature: Mapping[str, Any], threads: Optional[int] = None) -> "CpuSession":
        """A session over a build still in memory (`CpuTarget.build`), without writing an artifact."""
        _import_tvm(threads)
        self = cls.__new__(cls)
        self.artifact, self.entry = None, {}
        self._bind(executable, meta, weights, signature, "the weights")
        return self

    def _bind(self, lib: Any, meta: Mapping[str, Any], weights: Mapping[str, np.ndarray],
              signature: Mapping[str, Any], where: str) -> None:
        """Start the Relax VM over `lib` (a loaded model.so or an executable) and bind the weights once."""
        import tvm
        from tvm import relax
        from .session import signature_types

        self.signature = signature
        self._vm = relax.VirtualMachine(lib, tvm.cpu())
        self._fn = self._vm[meta.get("function", "main")]
        missing = [n for n in meta["params"] if n not in weights]
        if missing:
            raise ArtifactError(f"{where} lacks {missing[0]!r} that the cpu build needs")
        packed = meta.get("packed", {})
        self._params = [tvm.runtime.tensor(_pack(weights[n], packed.get(n, 0))) for n in meta["params"]]
        self._tvm = tvm
        self.input_names: list[str] = list(meta["inputs"])
        self.output_names: list[str] = list(meta["outputs"])
        self._in_types = signature_types(self.signature["inputs"])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._in_types, feeds)
        tvm = self._tvm
        # np.require, not np.ascontiguousarray: that one turns a 0-d input into shape (1,)
        args = [tvm.runtime.tensor(np.require(feeds[n], requirements="C")) for n in self.input_names]
        try:
            out = self._fn(*args, *self._params)
        except Exception as e:
            raise errors.ExecutionError(f"cpu: the model failed at run time: {str(e).splitlines()[0]}") from e
        outs = [out] if len(self.output_names) == 1 else list(out)
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}


def load(art: Artifact, entry: Mapping[str, Any], target: str = "cpu", threads: Optional[int] = None) -> CpuSession:
    return CpuSession(art, entry, threads=threads)

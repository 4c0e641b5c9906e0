"""The target-independent part of a TVM-built session: the Relax VM over one library on one device.

A TVM target's folder holds `model.json` (the VM function's name, its input,
weight-parameter and output names in call order, the graph's symbols) and a
built library. `VmSession` reads the meta file, loads the library, binds the
weights from the artifact's weights.safetensors once (on the session's
device), checks feeds against the manifest's signature and returns outputs
as NumPy arrays. `run` is safe to call from many threads: each thread gets
its own VirtualMachine (the Relax VM keeps its register frames in the VM
object) over the one loaded library and the one set of uploaded weights.
What differs per target (which library, which device, how a
weight is laid out) is decided by the caller: runtime/cpu_session.py,
runtime/gpu_session.py.

Imports TVM's runtime only, never the compiler: it works with a runtime-only
TVM (libtvm_compiler.so absent, or TVM_USE_RUNTIME_LIB=1), which is what a
deployment or a GPU machine reached with a size limit needs.
"""
from __future__ import annotations

import json
import struct
import threading
from typing import Any, Mapping

import numpy as np

from .. import errors
from .artifact import Artifact, ArtifactError
from .host_io import to_device, to_host
from .memory import check_fits
from .reference import check_feeds


def read_meta(art: Artifact, rel: str) -> dict[str, Any]:
    """A target's `model.json` (path relative to the artifact)."""
    path = art.path / rel
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{art.path}: cannot read {rel}: {e}") from None
    missing = [k for k in ("inputs", "params", "outputs") if k not in meta]
    if missing:
        raise ArtifactError(f"{art.path}: {rel} lacks {', '.join(missing)}; recompile the artifact")
    return meta


def check_library(art: Artifact, rel: str) -> None:
    """Refuse a shared library the dynamic loader would crash on (SIGBUS on a truncated file): the ELF
    header, program headers and section headers must lie within the file, and so must each loaded segment."""
    path = art.path / rel
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{art.path}: cannot read {rel}: {e.strerror or e}") from None
    why = None
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        why = "not a 64-bit little-endian ELF shared library"
    else:
        phoff, shoff = struct.unpack_from("<QQ", data, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
        if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data) or phentsize < 56:
            why = "its headers run past the end of the file"
        else:
            for i in range(phnum):
                kind, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
                if kind == 1 and offset + filesz > len(data):          # PT_LOAD
                    why = "a loadable segment runs past the end of the file"
                    break
    if why:
        raise ArtifactError(f"{art.path}: cannot load {rel}: {why} (truncated or not a library); "
                            "recompile the artifact")


def first_line(e: BaseException) -> str:
    """An exception's first line (TVM's messages carry a multi-line backtrace)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class VmSession:
    """`run(feeds) -> outputs` through the Relax VM on `device` (a tvm.runtime.Device).

    `library` and `meta` are paths relative to the artifact. A subclass whose
    weights are bound in another layout overrides `prepare` (called once per
    weight, at load time, with `self.meta` already read)."""

    def __init__(self, art: Artifact, target: str, library: str, meta: str, device: Any):
        import tvm

        self.artifact = art
        self.library = library
        info = read_meta(art, meta)
        check_library(art, library)
        try:
            lib = tvm.runtime.load_module(str(art.path / library))
        except Exception as e:  # noqa: BLE001 - TVM raises its own types for a bad or foreign library
            raise ArtifactError(f"{art.path}: target {target}: cannot load {library}: {first_line(e)}") from None
        self._start(target, lib, info, art.weights(), art.signature, device,
                    f"{art.path}: weights.safetensors")

    @classmethod
    def in_memory(cls, target: str, executable: Any, meta: Mapping[str, Any], weights: Mapping[str, np.ndarray],
                  signature: Mapping[str, Any], device: Any) -> "VmSession":
        """A session over a build still in memory (no artifact written): the ONNX backend's path."""
        self = cls.__new__(cls)
        self.artifact, self.library = None, None
        self._start(target, executable, dict(meta), weights, signature, device, "the weights")
        return self

    def _start(self, target: str, lib: Any, info: dict, weights: Mapping[str, np.ndarray],
               signature: Mapping[str, Any], device: Any, where: str) -> None:
        """Start the VM over `lib` (a loaded library or an executable) and bind the weights once."""
        import tvm
        from .session import signature_index_ranges, signature_types

        self.target = target
        self.signature = signature
        self.device = device
        self.meta = info
        self._lib = lib
        self._local = threading.local()
        self._function(info.get("function", "main"))      # a bad library fails here, at load time
        programs = info.get("functions", {})        # prefill / decode, beside `main`
        for name, f in [("build", info), *((f"{n} program", f) for n, f in programs.items())]:
            missing = [n for n in f["params"] if n not in weights]
            if missing:
                raise ArtifactError(f"{where} lacks {missing[0]!r} that the {target} {name} needs")
        # Uploaded once, shared by `main` and the programs: every run reuses these device tensors.
        bound = self._upload(dict.fromkeys(n for f in [info, *programs.values()] for n in f["params"]), weights)
        self._params = [bound[n] for n in info["params"]]
        self._tvm = tvm
        self.input_names: list[str] = list(info["inputs"])
        self.output_names: list[str] = list(info["outputs"])
        self._fresh = frozenset(info.get("fresh_outputs", ()))       # results handed out without a copy
        self._in_types = signature_types(self.signature["inputs"])
        self._ranges = signature_index_ranges(self.signature["inputs"])
        self._io_types = self._in_types + signature_types(self.signature["outputs"])
        self._programs: dict[str, tuple[list[str], list[Any]]] = {
            name: (list(f["inputs"]), [bound[n] for n in f["params"]]) for name, f in programs.items()}

    def _upload(self, names, weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """{name: device tensor of prepare(name, weights[name])}: on the host one huge-page-advised copy
        (host_weights.py), else one upload each."""
        from .host_io import is_host
        if is_host(self.device):
            from .host_weights import host_tensors
            return host_tensors(names, weights, self.prepare)
        import tvm
        return {n: tvm.runtime.tensor(np.ascontiguousarray(self.prepare(n, weights[n])), device=self.device)
                for n in names}

    def prepare(self, name: str, w: np.ndarray) -> np.ndarray:
        """The array bound to the VM for the stored weight `name` (as stored, by default)."""
        return w

    def _function(self, name: str) -> Any:
        """This thread's VM function `name`: the VM's register frames must not be shared between threads."""
        fns = getattr(self._local, "fns", None)
        if fns is None:
            from tvm.runtime.vm import VirtualMachine     # not tvm.relax: that needs the compiler library
            fns = self._local.fns = {"": VirtualMachine(self._lib, self.device)}
        if name not in fns:
            fns[name] = fns[""][name]
        return fns[name]

    def _drop_vm(self) -> None:
        """After a failed or interrupted call this thread's VM frames may be half-used: the next call on
        this thread starts a fresh VM over the same library and weights."""
        self._local.fns = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_fits(self.target, self._io_types, check_feeds(self._in_types, feeds, self._ranges))
        # np.require, not np.ascontiguousarray: that one turns a 0-d input into shape (1,)
        args = [to_device(np.require(feeds[n], requirements="C"), self.device) for n in self.input_names]
        fn = self._function(self.meta.get("function", "main"))
        try:
            out = fn(*args, *self._params)
            outs = [out] if len(self.output_names) == 1 else list(out)
            # to_host waits for the device (a copy back, or the host's synchronous VM): run() returns only
            # when the work is done, so timing run() measures the whole call on every device.
            return dict(zip(self.output_names, to_host(outs, self.device, self._fresh)))
        except Exception as e:  # noqa: BLE001 - the VM raises TVM errors; the user sees one line
            self._drop_vm()
            raise errors.ExecutionError(f"{self.target}: the model failed at run time: {first_line(e)}") from e
        except BaseException:      # interrupted (KeyboardInterrupt) mid-call
            self._drop_vm()
            raise

    # ---- generation: runtime/generation.py's session protocol over the library's prefill / decode --
    @property
    def generation(self) -> dict[str, Any]:
        """The artifact's `generation` entry; no cache layers when this library has no programs (then
        generation recomputes, with a warning)."""
        info = dict((self.artifact.manifest.get("generation") if self.artifact is not None else None) or {})
        if not {"prefill", "decode"} <= set(self._programs):
            info["layers"] = []
        return info

    def new_cache(self, batch: int, max_length: int) -> dict[str, Any]:
        """Zeroed device buffers per cache tensor, allocated once; `run_program` updates them in place."""
        from .reference import new_cache_arrays
        return {n: self._tvm.runtime.tensor(a, device=self.device)
                for n, a in new_cache_arrays(self.generation, batch, max_length).items()}

    def run_program(self, name: str, feeds: Mapping[str, np.ndarray], cache: dict[str, Any]) -> np.ndarray:
        """Run `prefill` / `decode` over `cache` (written in place); the last positions' logits [batch, vocab]."""
        inputs, params = self._programs[name]
        fn = self._function(name)
        args = [cache[n] if n in cache else to_device(np.require(feeds[n], np.int64, "C"), self.device)
                for n in inputs]
        try:
            out = fn(*args, *params)
            logits, = to_host([out[0]], self.device)
        except Exception as e:  # noqa: BLE001 - the VM raises TVM errors; the user sees one line
            self._drop_vm()
            raise errors.ExecutionError(f"{self.target}: the {name} program failed at run time: {first_line(e)}") from e
        except BaseException:
            self._drop_vm()
            raise
        for n, o in zip([n for n in inputs if n in cache], list(out)[1:]):
            cache[n] = o          # the very buffer passed in (updated in place): no copy
        return logits

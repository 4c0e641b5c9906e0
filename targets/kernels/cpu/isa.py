"""The vector width the cpu kernels are built for, from the LLVM CPU the build targets.

Register tiles are sized in vector registers: AVX-512 has 32 registers of 16 float32 lanes,
AVX2 16 of 8. A tile sized for one spills on the other (slower, never wrong), so the cpu
target lowers inside `with target:` (its mcpu decides); `building_for(mcpu)` sets it by name;
kernels built outside either get the host's.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

_LANES: contextvars.ContextVar[int] = contextvars.ContextVar("cpu_vector_lanes", default=0)


@functools.lru_cache(maxsize=None)
def lanes_of(mcpu: str) -> int:
    """float32 lanes of the widest vector register of LLVM CPU `mcpu` (16: AVX-512, else 8)."""
    import tvm
    from tvm.target import codegen
    try:
        avx512 = bool(codegen.target_has_features("avx512f", tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))
    except Exception:       # an LLVM without the name: the AVX2 tiles are correct everywhere
        avx512 = False
    return 16 if avx512 else 8


def vector_lanes() -> int:
    """The width set by `building_for`, else the current TVM target's (the cpu target lowers inside
    `with target:`), else the host's."""
    lanes = _LANES.get()
    if lanes:
        return lanes
    import tvm
    t = tvm.target.Target.current(allow_none=True)
    if t is not None and t.kind.name == "llvm" and t.attrs.get("mcpu"):
        return lanes_of(str(t.attrs["mcpu"]))
    from ...cpu import host_mcpu
    return lanes_of(host_mcpu())


@contextlib.contextmanager
def building_for(mcpu: str):
    token = _LANES.set(lanes_of(mcpu))
    try:
        yield
    finally:
        _LANES.reset(token)

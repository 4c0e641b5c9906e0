"""What the cpu kernels are built for, from the LLVM CPU the build targets: the vector width,
whether the CPU has byte dot products (`byte_dot`) and AMX tiles (`amx`).

Register tiles are sized in vector registers: AVX-512 has 32 registers of 16 float32 lanes,
AVX2 16 of 8. A tile sized for one spills on the other (slower, never wrong), so the cpu
target lowers inside `with target:` (its mcpu decides); `building_for(mcpu)` sets it by name;
kernels built outside either get the host's.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

_MCPU: contextvars.ContextVar[str] = contextvars.ContextVar("cpu_mcpu", default="")
BYTE_DOT_FEATURES = ("avx512f", "avx512vnni", "avx512vbmi")   # vpdpbusd, and vpermb / vpmultishiftqb for nibbles
AMX_FEATURES = ("amx-tile", "amx-bf16")                         # amx.py's f32 tiles


@functools.lru_cache(maxsize=None)
def _features(mcpu: str) -> frozenset:
    import tvm
    from tvm.target import codegen
    try:
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        return frozenset(f for f in BYTE_DOT_FEATURES + AMX_FEATURES if codegen.target_has_features(f, target))
    except Exception:       # an LLVM without the name: the AVX2 tiles are correct everywhere
        return frozenset()


def lanes_of(mcpu: str) -> int:
    """float32 lanes of the widest vector register of LLVM CPU `mcpu` (16: AVX-512, else 8)."""
    return 16 if "avx512f" in _features(mcpu) else 8


def _mcpu() -> str:
    """The CPU set by `building_for`, else the current TVM target's (the cpu target lowers inside
    `with target:`), else the host's."""
    mcpu = _MCPU.get()
    if mcpu:
        return mcpu
    import tvm
    t = tvm.target.Target.current(allow_none=True)
    if t is not None and t.kind.name == "llvm" and t.attrs.get("mcpu"):
        return str(t.attrs["mcpu"])
    from ...cpu import host_mcpu
    return host_mcpu()


def vector_lanes() -> int:
    return lanes_of(_mcpu())


def byte_dot() -> bool:
    """Whether the build CPU multiplies bytes into int32 sums (AVX512-VNNI) and permutes bytes and nibbles
    (AVX512-VBMI): int_dot.py's quantized GEMVs."""
    return _features(_mcpu()) >= frozenset(BYTE_DOT_FEATURES)


def amx() -> bool:
    """Whether the build CPU has AMX tiles with bf16 products (amx.py's f32 GEMM tiles)."""
    return _features(_mcpu()) >= frozenset(AMX_FEATURES)


@contextlib.contextmanager
def building_for(mcpu: str):
    token = _MCPU.set(mcpu)
    try:
        yield
    finally:
        _MCPU.reset(token)

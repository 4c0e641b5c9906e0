"""targets/kernels/memo.py: a kernel is parsed once per distinct request, and only then."""
from __future__ import annotations

import dataclasses

import pytest

tvm = pytest.importorskip("tvm")

from polyport.targets.kernels.cpu import isa  # noqa: E402
from polyport.targets.kernels.cpu.gemm import dense_packed_func  # noqa: E402
from polyport.targets.kernels.memo import cached_kernel  # noqa: E402


def test_the_same_request_returns_the_same_primfunc_and_other_widths_rebuild():
    a = dense_packed_func(32, 2, 16)
    assert dense_packed_func(32, 2, 16) is a
    assert dense_packed_func(32, 2, 16, gated=True) is not a
    with isa.building_for("x86-64-v3"):                        # AVX2: other register tiles
        avx2 = dense_packed_func(32, 2, 16)
    with isa.building_for("skylake-avx512"):
        avx512 = dense_packed_func(32, 2, 16)
    assert avx2 is not avx512
    with isa.building_for("icelake-server"):                   # AVX-512 with VNNI and VBMI: byte dot products
        assert dense_packed_func(32, 2, 16) is not avx512
    with isa.building_for("skylake-avx512"):                   # a CPU with the same features shares it
        assert dense_packed_func(32, 2, 16) is avx512


@dataclasses.dataclass(frozen=True)
class _Spec:
    n: int


def test_keys_tell_apart_equal_python_values_and_skip_unhashable_arguments():
    calls = []

    @cached_kernel
    def build(*args, **kwargs):
        calls.append((args, kwargs))
        return object()

    assert build(1, shape=[1, None]) is build(1, shape=(1, None))   # a list is keyed as its tuple
    assert build(True) is not build(1) and build(1.0) is not build(1)
    assert build(_Spec(3)) is build(_Spec(3)) is not build(_Spec(4))
    assert build(tvm.ir.PrimType("float32")) is build(tvm.ir.PrimType("float32")) is not build("float16")
    before = len(calls)
    build({"a": 1}), build({"a": 1})                                  # a dict: built every time
    assert len(calls) == before + 2


def test_macros_find_their_parser_by_the_frame_walk(monkeypatch):
    """TVM still calls the lookup memo.py installs (a renamed hook would silently bring back the slow
    source-reading walk), and a macro parsed through it expands as TVM's own would."""
    from tvm.script import tirx as T
    from tvm.script.parser.core.parser import ScriptMacro

    from polyport.targets.kernels import memo

    assert ScriptMacro._find_parser_def is memo._parser_of_caller
    calls = []

    def counted(macro):
        calls.append(macro)
        return memo._parser_of_caller(macro)

    monkeypatch.setattr(ScriptMacro, "_find_parser_def", counted)

    @T.macro
    def twice(buf, i):
        buf[i] = buf[i] * T.float32(2)

    @T.prim_func(private=True)
    def f(a: T.Buffer((4,), "float32")):
        for i in range(4):
            twice(a, i)

    assert len(calls) == 1
    assert "a[i] = a[i] * T.float32(2.0)" in f.script()

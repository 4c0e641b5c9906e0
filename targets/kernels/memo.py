"""Kernel builders run once per distinct request.

TVMScript parses every `T.prim_func` in Python, and most of that time goes to
`inspect` walking the caller's frames: 0.1-1 s per kernel. A model asks for the
same kernel once per layer and per program (prefill, decode, the full forward),
so a 16-layer export spent 85% of a half-hour cpu compile re-parsing identical
kernels. A PrimFunc is immutable IR, so one object serves every request with the
same arguments and the same build CPU features (cpu/isa.py: the tiles and instructions depend on them).

The walk itself is made cheap too (`_parser_of_caller`): each `T.macro` call looks up its parser
with `inspect.getouterframes`, which reads the source line of every frame on the parser's deep
stack only to keep `frame.f_globals`. Walking `f_back` finds the same parser without reading any
source: a gated 1536 x 1536 GEMM parses in 0.4-0.7 s, not 2.0 s, to the same TVMScript.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, TypeVar

import tvm
from tvm.script.parser.core.parser import ScriptMacro

from .cpu.isa import amx, byte_dot, vector_lanes

F = TypeVar("F", bound=Callable[..., Any])
_PLAIN = (bool, int, float, str, type(None))


class _Unkeyable(Exception):
    pass


def _key(v: Any) -> Any:
    # typed, so that 1, 1.0 and True (equal in Python) never share a kernel
    if isinstance(v, _PLAIN):
        return type(v).__name__, v
    if isinstance(v, (list, tuple)):
        return tuple(_key(x) for x in v)
    if isinstance(v, tvm.ir.PrimType):                # a Relax value's dtype, as the lowerings pass it
        return "dtype", str(v.dtype)
    if dataclasses.is_dataclass(v) and not isinstance(v, type) and v.__dataclass_params__.frozen:
        return v
    raise _Unkeyable


def _parser_of_caller(macro: ScriptMacro):
    """The parser of the TVMScript function being parsed: the first frame up the stack that holds it (what
    TVM's own lookup returns, without the source lines it reads for every frame)."""
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


ScriptMacro._find_parser_def = _parser_of_caller


def cached_kernel(builder: F) -> F:
    """`builder`, memoised on its arguments (plain values, lists of them, frozen dataclasses) and
    the current vector width; a call with any other argument builds afresh."""
    built: dict = {}

    @functools.wraps(builder)
    def cached(*args, **kwargs):
        try:
            key = (vector_lanes(), byte_dot(), amx(), _key(args), _key(tuple(sorted(kwargs.items()))))
        except _Unkeyable:
            return builder(*args, **kwargs)
        if key not in built:
            built[key] = builder(*args, **kwargs)
        return built[key]

    return cached                               # type: ignore[return-value]

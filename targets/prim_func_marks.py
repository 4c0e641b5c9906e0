"""Module passes that set one attribute on the PrimFuncs a predicate picks (fusion.py, llvm_noalias.py)."""
from __future__ import annotations

from typing import Any, Callable


def scalar_params(func) -> int:
    """How many of a PrimFunc's parameters are scalars (the rest are buffers or pointers)."""
    from tvm import ir
    return sum(isinstance(p.ty, ir.PrimType) for p in func.params)


def mark_prim_funcs(name: str, attr: str, value: Any, picks: Callable[[Any], bool]):
    """A module pass called `name`: `attr` = `value` on every PrimFunc for which `picks(func)` holds."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod, _ctx):
        marked = {gv: f.with_attr(attr, value) for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and picks(f)}
        for gv, f in marked.items():
            mod[gv] = f
        return mod

    return run

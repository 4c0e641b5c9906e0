"""Which results of a Relax function come back in a buffer of their own, so a host session may hand
them to the caller without a copy (runtime/host_io.py).

A result is fresh when it is the output of a kernel call (`call_tir`, not in place), possibly through
reshapes (views) and renamings. Anything else may be memory the caller must not get: a weight or a
feed (a graph output that is an initializer or an input, reshaped or not), a folded constant, a
buffer updated in place, or the same buffer as an earlier result. The analysis runs on the module
as built (after fusion and RewriteDataflowReshape, which turns reshape kernels into views); what it
cannot classify counts as not fresh, so the session copies it.
"""
from __future__ import annotations


def fresh_outputs(func) -> list[int]:
    """The indices of `func`'s results (a Relax function) that are fresh buffers, each once."""
    from tvm import ir, relax
    reshape, call_tir = ir.Op.get("relax.reshape"), ir.Op.get("relax.call_tir")
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings
             if isinstance(b, relax.VarBinding)}

    def source(e):
        """The (kernel call's var, tuple index) whose buffer `e` is, or None."""
        while True:
            value = bound.get(e) if isinstance(e, relax.Var) else None
            if isinstance(value, relax.Var):
                e = value
            elif isinstance(value, relax.Call) and value.op.same_as(reshape):
                e = value.args[0]
            elif isinstance(value, relax.Call) and value.op.same_as(call_tir):
                return e, None
            elif isinstance(value, relax.TupleGetItem):
                inner = bound.get(value.tuple_value) if isinstance(value.tuple_value, relax.Var) else None
                if isinstance(inner, relax.Call) and inner.op.same_as(call_tir):
                    return value.tuple_value, value.index
                return None
            else:
                return None

    out = func.body.body
    fields = list(out.fields) if isinstance(out, relax.Tuple) else [out]
    fresh, seen = [], set()
    for i, e in enumerate(fields):
        src = source(e)
        if src is not None and src not in seen:
            fresh.append(i)
            seen.add(src)
    return fresh

"""The Relax build pipeline of the cpu target: TVM's default one, then every PrimFunc marked `tirx.noalias`.

TVM 0.27's LLVM codegen declares all functions of a module (sorted by symbol) before it emits any, and
the no-alias flag it emits every body with is the one of the last declared function, not the body's
own. VMShapeLower's shape functions carry no `tirx.noalias`; when one sorts last (a model whose
kernels' names sort before "shape_func", e.g. one quantized layer), every kernel is emitted without
it: its pointers may alias, so LLVM stores the register accumulators back at every k. Measured on an
int4 128 x 2048 x 2048 QuantMatMul (polyport cpu, 2 threads): 42 ms in such a module, 24 ms for the
same PrimFunc built alone. A shape function takes one buffer (the shape heap), so the flag holds for it
trivially; marked, every function of the module agrees, whatever the order.
"""
from __future__ import annotations

from .prim_func_marks import mark_prim_funcs, scalar_params


def mark_single_buffer_noalias():
    """A module pass: `tirx.noalias` on each PrimFunc with at most one buffer or pointer parameter."""
    return mark_prim_funcs("MarkSingleBufferNoAlias", "tirx.noalias", True,
                           lambda f: not (f.attrs or {}).get("tirx.noalias") and len(f.params) - scalar_params(f) <= 1)


def build_pipeline():
    """Relax's default build pipeline (it writes the shape functions), then the marking."""
    import tvm
    from tvm import relax
    return tvm.transform.Sequential([relax.get_pipeline("default"), mark_single_buffer_noalias()])

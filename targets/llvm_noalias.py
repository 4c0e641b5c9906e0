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


def _pointer_params(func) -> int:
    from tvm import ir
    return sum(not isinstance(p.ty, ir.PrimType) for p in func.params)


def mark_single_buffer_noalias():
    """A module pass: `tirx.noalias` on each PrimFunc with at most one buffer or pointer parameter."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="MarkSingleBufferNoAlias")
    def run(mod, _ctx):
        marked = {gv: f.with_attr("tirx.noalias", True) for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and not (f.attrs or {}).get("tirx.noalias")
                  and _pointer_params(f) <= 1}
        for gv, f in marked.items():
            mod[gv] = f
        return mod

    return run


def build_pipeline():
    """Relax's default build pipeline (it writes the shape functions), then the marking."""
    import tvm
    from tvm import relax
    return tvm.transform.Sequential([relax.get_pipeline("default"), mark_single_buffer_noalias()])

"""Legalize the Relax ops a lowering emitted and fuse neighbouring elementwise / injective kernels, the
way TVM's own pipelines do, for every target that builds through TVM (cpu, cuda, rocm).

Fusing matters most where kernels are small: a deepseek_v3_a layer's MLA plumbing (transpose, split,
slice, concatenate, RoPE, broadcast) is a dozen kernels of a few microseconds each, and each unfused
one is a VM call plus an intermediate tensor. Kernels polyport writes scheduled carry `op_pattern` 8
(opaque), so FuseOps leaves them whole.

One guard: a legalized kernel that takes a scalar (`shape_to_tensor` of a symbolic dim: the
derived programs' positions over a symbolic batch) is kept out of fusion. FuseTIR's RenewDefs
defines the scalar twice when such a kernel joins a group, and the build stops with an InternalError.
"""
from __future__ import annotations

from .prim_func_marks import mark_prim_funcs, scalar_params

OPAQUE = 8      # relay/relax OpPatternKind kOpaque


def keep_scalar_kernels_unfused():
    """A module pass: `op_pattern` opaque on each PrimFunc with a scalar parameter."""
    return mark_prim_funcs("KeepScalarKernelsUnfused", "op_pattern", OPAQUE, lambda f: scalar_params(f) > 0)


def fuse() -> list:
    """The passes, in order: annotate each kernel's pattern, fuse, merge each group into one PrimFunc."""
    from tvm import relax
    return [relax.transform.AnnotateTIROpPattern(), keep_scalar_kernels_unfused(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]


def legalize() -> list:
    """Relax ops -> TIR kernels. A lowering's reshapes come in chains ([T, H] -> [1, T, H] -> [T, H] around
    every GEMM): collapsed first, each link left would be three VM instructions (shape, view, kill)."""
    from tvm import relax
    return [relax.transform.RemoveRedundantReshape(), relax.transform.LegalizeOps()]


def legalize_and_fuse() -> list:
    return [*legalize(), *fuse()]

"""TVM kernels for the cpu target: one module per fused-op family.

norm, rotary, mlp (row-major weights) and moe expose TE functions (used with
`BlockBuilder.emit_te`, scheduled by targets/schedule_cpu.py). attention and gemm
(weights bound pre-packed) build hand-scheduled TIR PrimFuncs that the lowering adds
with `call_tir` and marks opaque. All are correct for symbolic extents (the sequence
length is a `tirx.Var`); fastmath and parallel hold what they share.
"""

"""TVM TE/TIR kernels for the cpu target: one module per fused-op family.

Each module exposes a TE function (usable with `BlockBuilder.emit_te`, so it
becomes a TIR PrimFunc called through `call_tir`) that is correct for symbolic
extents (the sequence length is a `tirx.Var`).
"""

"""Lowerings to Relax: one table per kernel set, filled by one module per op family.

`_Lowerer.lower_node` (targets/tvm_lower.py) looks every op up here, standard and
fused alike, in the table of the Target's kernel set. A lowering is `fn(lw, node)`
with `lw` the `_Lowerer` (values, dims, shape propagation, the BlockBuilder); it
returns the output exprs (or known shape arrays). `@lowers(..., dtypes=...)` names
the element types a lowering implements with ONNX's (or the fused op's) semantics;
any other dtype is refused with an error naming the node, op and dtype.
`kernels=` registers a lowering for some kernel sets only (default: all of them):

- "cpu": hand-written, already scheduled cpu kernels; dense weights bound pre-packed;
- "portable": TE computes any target schedules (the GPU targets, with dlight).
"""
from __future__ import annotations

from typing import Callable, Optional

from ...ir.types import TensorType

FLOAT = ("f16", "f32", "f64")
SIGNED = ("i8", "i16", "i32", "i64")
UNSIGNED = ("u8", "u16", "u32", "u64")
INT = SIGNED + UNSIGNED
NUMERIC = FLOAT + INT
ANY = NUMERIC + ("bool",)
# element types any cpu-target node may touch (bf16 only where an op's lowering lists it); the rest
# (fp8/fp6/fp4, 2/4-bit ints, complex, strings) have no LLVM arithmetic or DLPack transfer in TVM 0.27
CPU_DTYPES = frozenset(ANY + ("bf16",))
FLOAT_BF = FLOAT + ("bf16",)
NUMERIC_BF = NUMERIC + ("bf16",)

KERNEL_SETS = ("cpu", "portable")
Lowering = Callable[..., object]
LOWERINGS: dict[str, dict[str, Lowering]] = {k: {} for k in KERNEL_SETS}   # kernel set -> op -> lowering


def lowers(*ops: str, dtypes: Optional[tuple[str, ...]] = None, operand: int = 0,
           kernels: tuple[str, ...] = KERNEL_SETS):
    """Register `fn` for `ops` in the tables of `kernels`; with `dtypes`, input `operand` must have one
    of those element types."""
    def deco(fn: Lowering) -> Lowering:
        def checked(lw, node):
            if dtypes is not None:
                dt = _dtype_name(node.inputs[operand])
                if dt not in dtypes:
                    raise lw.unsupported(node, f"dtype {dt} is not supported (this lowering takes "
                                               f"{', '.join(dtypes)})")
            return fn(lw, node)
        for k in kernels:
            for op in ops:
                assert op not in LOWERINGS[k], (k, op)
                LOWERINGS[k][op] = checked
        return fn
    return deco


def _dtype_name(v) -> Optional[str]:
    t = None if v is None else v.type
    return str(t.dtype) if isinstance(t, TensorType) and t.dtype is not None else None


def check_dtypes(lw, node) -> None:
    """Refuse a node touching a tensor whose element type the cpu target cannot compute in."""
    for v in list(node.inputs) + list(node.outputs):
        dt = _dtype_name(v)
        if dt is not None and dt not in CPU_DTYPES:
            raise lw.unsupported(node, f"dtype {dt} (of {v.name}) is not supported by the {lw.target_name} target")


def lookup(op: str, kernels: str = "cpu") -> Optional[Lowering]:
    """The lowering of `op` (e.g. "Add", "polyport::MoE") in kernel set `kernels`."""
    from . import arith, cache, compress, dense, elementwise, fused, nn, quant, reduce, shape, tensor  # noqa: F401
    return LOWERINGS[kernels].get(op)

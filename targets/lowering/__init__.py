"""Lowerings of standard ONNX ops to Relax, one module per op family.

`_Lowerer.lower_node` (targets/tvm_lower.py) looks an op up here when it has no
`op_<Name>` method of its own. A lowering is `fn(lw, node)` with `lw` the
`_Lowerer` (values, shapes, the BlockBuilder); it returns the output exprs
(or known shape arrays) like an `op_` method. `@lowers(..., dtypes=...)` names the
element types a lowering implements with ONNX's semantics; any other dtype is
refused with an error naming the node, op and dtype.
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

Lowering = Callable[..., object]
LOWERINGS: dict[str, Lowering] = {}


def lowers(*ops: str, dtypes: Optional[tuple[str, ...]] = None, operand: int = 0):
    """Register `fn` for `ops`; with `dtypes`, input `operand` must have one of those element types."""
    def deco(fn: Lowering) -> Lowering:
        def checked(lw, node):
            if dtypes is not None:
                dt = _dtype_name(node.inputs[operand])
                if dt not in dtypes:
                    raise lw.unsupported(node, f"dtype {dt} is not supported (this lowering takes "
                                               f"{', '.join(dtypes)})")
            return fn(lw, node)
        for op in ops:
            assert op not in LOWERINGS, op
            LOWERINGS[op] = checked
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


def lookup(op: str) -> Optional[Lowering]:
    from . import cache, elementwise, nn, quant, reduce, tensor  # noqa: F401 - each registers its lowerings
    return LOWERINGS.get(op)

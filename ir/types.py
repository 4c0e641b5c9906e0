"""Types of IR values: tensors with (possibly symbolic) shapes, sequences, optionals."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from .dtypes import DType
from .symbolic import Dim, SymExpr

# A dim in a type: an int, a symbolic expression, or None when unknown.
TypeDim = Optional[Dim]


@dataclasses.dataclass(frozen=True)
class TensorType:
    dtype: Optional[DType]                      # None: unknown element type
    shape: Optional[tuple[TypeDim, ...]]        # None: unknown rank

    def __post_init__(self):
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(_check_dim(d) for d in self.shape))

    @property
    def rank(self) -> Optional[int]:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> frozenset[str]:
        if self.shape is None:
            return frozenset()
        return frozenset(s for d in self.shape if isinstance(d, SymExpr) for s in d.symbols)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, None if shape is None else tuple(shape))

    def __str__(self) -> str:
        dt = str(self.dtype) if self.dtype is not None else "?"
        if self.shape is None:
            return f"{dt}[*]"
        return f"{dt}[{', '.join(format_dim(d) for d in self.shape)}]"


@dataclasses.dataclass(frozen=True)
class SequenceType:
    elem: "Type"

    def __str__(self) -> str:
        return f"seq<{self.elem}>"


@dataclasses.dataclass(frozen=True)
class OptionalType:
    elem: "Type"

    def __str__(self) -> str:
        return f"optional<{self.elem}>"


@dataclasses.dataclass(frozen=True)
class OpaqueType:
    """A type polyport carries but does not model (maps, sparse tensors)."""
    description: str

    def __str__(self) -> str:
        return f"opaque<{self.description}>"


Type = Union[TensorType, SequenceType, OptionalType, OpaqueType]

UNKNOWN = TensorType(None, None)


def format_dim(d: TypeDim) -> str:
    return "?" if d is None else str(d)


def _check_dim(d) -> TypeDim:
    if d is None or isinstance(d, SymExpr):
        return d
    if isinstance(d, bool) or not hasattr(d, "__index__"):
        raise TypeError(f"a dim is an int, a SymExpr or None, got {d!r}")
    return int(d)


def tensor(dtype: DType, shape: Sequence[TypeDim] | None) -> TensorType:
    return TensorType(dtype, None if shape is None else tuple(shape))

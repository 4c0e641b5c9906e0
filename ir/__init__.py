"""polyport's IR: typed SSA graphs with symbolic shapes, an op registry, printer and verifier."""
from .dtypes import DType
from .graph import Graph, Node, Value
from .symbolic import Dim, SymExpr, sym
from .types import SequenceType, OptionalType, TensorType, Type

__all__ = ["DType", "Graph", "Node", "Value", "Dim", "SymExpr", "sym", "TensorType", "SequenceType",
           "OptionalType", "Type"]

from . import fused, shape_value  # noqa: E402,F401 - registers polyport's own ops

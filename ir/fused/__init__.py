"""polyport's fused ops (domain `polyport`): what every target lowers to fast kernels.

Each module declares one op family once: schema, type inference and the NumPy
reference that defines its meaning. References compute in fp32 and return the
input's dtype. Importing this package registers them all.

Fused nodes are made only through `build` (or, in the importer, with attributes
from `checked_attrs`): attributes are checked against the schema, and readers
take defaults from `attrs_of`, never spelling them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..graph import Graph, Node, Value
from ..ops import POLYPORT_DOMAIN, RunContext, checked_attrs, lookup
from . import attention, cache, compress, mlp, moe, norm, quant, rotary  # noqa: F401


def build(graph: Graph, op_type: str, inputs: Sequence[Optional[Value]], attrs: dict, out_type, *,
          before: Optional[Node] = None, name: Optional[str] = None) -> Value:
    """Add one polyport op to `graph`, its attributes checked against its schema; return its output."""
    return graph.make_node(op_type, list(inputs), attrs=checked_attrs(op_type, attrs, where=name or ""),
                           domain=POLYPORT_DOMAIN, types=[out_type], name=name or op_type, before=before).outputs[0]


def evaluate(op_type: str, inputs: Sequence[Optional[np.ndarray]], **attrs) -> np.ndarray:
    """The reference output of one polyport op on NumPy inputs (what every implementation is tested against)."""
    node = Node(op_type, [], [], checked_attrs(op_type, attrs), POLYPORT_DOMAIN, op_type)
    return lookup(POLYPORT_DOMAIN, op_type).reference(node, list(inputs), RunContext({}))[0]

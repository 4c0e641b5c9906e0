"""Checks the invariants the IR promises (see graph.py); passes run it after each step."""
from __future__ import annotations

from .graph import Graph


class VerificationError(AssertionError):
    pass


def verify(graph: Graph) -> None:
    _verify(graph, visible=set())


def _verify(graph: Graph, visible: set[int]) -> None:
    defined = set(visible)
    defined.update(id(v) for v in graph.inputs)
    defined.update(id(v) for v in graph.constants.values())
    for name, v in graph.constants.items():
        if v.const is None or v.name != name:
            raise VerificationError(f"graph {graph.name}: constant {name!r} has no value or a wrong name")
    for node in graph.nodes:
        if node.graph is not graph:
            raise VerificationError(f"{node!r} does not point back to graph {graph.name}")
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                raise VerificationError(f"{node!r} input {i} (%{v.name}) is used before it is defined")
            if (node, i) not in v._uses:
                raise VerificationError(f"%{v.name} does not list its use by {node!r} (input {i})")
        for sub in node.subgraphs():
            _verify(sub, defined)
        for o in node.outputs:
            if o.producer is not node:
                raise VerificationError(f"%{o.name}: producer is not {node!r}")
            for user, i in o._uses:
                if user.inputs[i] is not o:
                    raise VerificationError(f"%{o.name}: stale use by {user!r} (input {i})")
            defined.add(id(o))
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph {graph.name}: output %{v.name} is not defined")
        if graph not in v._output_of:
            raise VerificationError(f"graph {graph.name}: output %{v.name} does not record it")

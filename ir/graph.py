"""The IR core: Value, Node, Graph, with exact use-def chains.

Invariants every pass may rely on (and the verifier checks):
- a Value is produced by at most one Node (or is a graph input or a constant);
- `value.uses` lists exactly the (node, input index) pairs reading it;
- node inputs are changed only through `Node.set_input` / `Value.replace_all_uses_with`,
  which keep the use lists exact;
- `graph.nodes` is a snapshot, so a pass may add or remove nodes while iterating it.
Subgraphs (If/Loop/Scan bodies) are Graphs held in node attributes; their nodes
may read values of the enclosing graphs directly.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from . import dtypes
from .types import TensorType, Type, UNKNOWN


class Value:
    __slots__ = ("name", "type", "producer", "index", "const", "_uses", "_output_of", "__weakref__")

    def __init__(self, name: str, type: Type = UNKNOWN, const: Optional[np.ndarray] = None):
        self.name = name
        self.type = type
        self.producer: Optional[Node] = None
        self.index = 0
        self.const = const          # set for constants (weights, folded values)
        self._uses: list[tuple[Node, int]] = []
        self._output_of: list[Graph] = []

    @property
    def uses(self) -> tuple[tuple["Node", int], ...]:
        return tuple(self._uses)

    @property
    def users(self) -> list["Node"]:
        seen: dict[int, Node] = {}
        for node, _ in self._uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    @property
    def is_graph_output(self) -> bool:
        return bool(self._output_of)

    @property
    def is_constant(self) -> bool:
        return self.const is not None

    @property
    def dtype(self):
        return getattr(self.type, "dtype", None)

    @property
    def shape(self):
        return getattr(self.type, "shape", None)

    def replace_all_uses_with(self, other: "Value") -> None:
        if other is self:
            return
        for node, i in list(self._uses):
            node.set_input(i, other)
        for g in list(self._output_of):
            g.set_outputs([other if v is self else v for v in g.outputs])

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    __slots__ = ("op_type", "domain", "attrs", "name", "_inputs", "outputs", "graph", "__weakref__")

    def __init__(self, op_type: str, inputs: Sequence[Optional[Value]], outputs: Sequence[Value],
                 attrs: Optional[dict[str, Any]] = None, domain: str = "", name: str = ""):
        self.op_type = op_type
        self.domain = "" if domain == "ai.onnx" else domain
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.name = name
        self.graph: Optional[Graph] = None
        self._inputs: list[Optional[Value]] = []
        for v in inputs:
            self._inputs.append(v)
            if v is not None:
                v._uses.append((self, len(self._inputs) - 1))
        self.outputs: tuple[Value, ...] = tuple(outputs)
        for i, v in enumerate(self.outputs):
            if v.producer is not None:
                raise ValueError(f"value {v.name!r} already has a producer ({v.producer.name})")
            v.producer, v.index = self, i

    @property
    def inputs(self) -> tuple[Optional[Value], ...]:
        return tuple(self._inputs)

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    def set_input(self, i: int, value: Optional[Value]) -> None:
        old = self._inputs[i]
        if old is not None:
            old._uses.remove((self, i))
        self._inputs[i] = value
        if value is not None:
            value._uses.append((self, i))

    def _detach_inputs(self) -> None:
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.remove((self, i))
        self._inputs = [None] * len(self._inputs)

    def subgraphs(self) -> Iterator["Graph"]:
        for value in self.attrs.values():
            if isinstance(value, Graph):
                yield value
            elif isinstance(value, list) and value and isinstance(value[0], Graph):
                yield from value

    def __repr__(self) -> str:
        return f"<Node {self.name or '?'}: {self.qualified_op}>"


class Graph:
    """An ordered (topologically sorted) list of nodes with inputs, outputs and constants."""

    def __init__(self, name: str = "main", parent: Optional["Graph"] = None):
        self.name = name
        self.parent = parent
        self.inputs: list[Value] = []
        self._outputs: list[Value] = []
        self.constants: dict[str, Value] = {}      # weights and folded constants, by name
        self._nodes: dict[Node, None] = {}         # insertion-ordered set
        self.opset_imports: dict[str, int] = {} if parent is None else parent.opset_imports
        self.metadata: dict[str, str] = {}
        self._names: set[str] = set() if parent is None else parent._names
        self._counter = itertools.count() if parent is None else parent._counter

    # ---- names -----------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        base = base or "v"
        name = base
        while name in self._names:
            name = f"{base}_{next(self._counter)}"
        self._names.add(name)
        return name

    def root(self) -> "Graph":
        g = self
        while g.parent is not None:
            g = g.parent
        return g

    # ---- values ----------------------------------------------------------------------
    def add_input(self, name: str, type: Type) -> Value:
        v = Value(self.unique_name(name), type)
        self.inputs.append(v)
        return v

    def add_constant(self, name: str, array: np.ndarray) -> Value:
        array = np.asarray(array)
        v = Value(self.unique_name(name), TensorType(dtypes.from_numpy(array.dtype), array.shape), const=array)
        self.constants[v.name] = v
        return v

    @property
    def outputs(self) -> tuple[Value, ...]:
        return tuple(self._outputs)

    def set_outputs(self, values: Iterable[Value]) -> None:
        for v in self._outputs:
            v._output_of.remove(self)
        self._outputs = list(values)
        for v in self._outputs:
            v._output_of.append(self)

    # ---- nodes -----------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def make_node(self, op_type: str, inputs: Sequence[Optional[Value]], *, attrs=None, domain: str = "",
                  num_outputs: int = 1, output_names: Sequence[str] = (), types: Sequence[Type] = (),
                  name: str = "", before: Optional[Node] = None) -> Node:
        """Create a node with fresh output values and insert it (at the end, or before `before`)."""
        names = list(output_names) or [f"{(name or op_type).lower()}_out"] * num_outputs
        outs = [Value(self.unique_name(n), types[i] if i < len(types) else UNKNOWN) for i, n in enumerate(names)]
        node = Node(op_type, inputs, outs, attrs, domain, self.unique_name(name or op_type))
        if before is None:
            self.append(node)
        else:
            self.insert_before(before, node)
        return node

    def append(self, node: Node) -> Node:
        node.graph = self
        self._nodes[node] = None
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        if anchor.graph is not self:
            raise ValueError(f"{anchor!r} is not in graph {self.name}")
        node.graph = self
        items = list(self._nodes)
        items.insert(items.index(anchor), node)
        self._nodes = dict.fromkeys(items)
        return node

    def remove(self, node: Node) -> None:
        """Remove a node whose outputs are no longer used."""
        for out in node.outputs:
            if out._uses or out._output_of:
                raise ValueError(f"cannot remove {node!r}: output {out.name!r} is still used")
        node._detach_inputs()
        del self._nodes[node]
        node.graph = None

    def remove_unused(self) -> int:
        """Dead-code elimination over this graph (not its subgraphs' internals). Returns count."""
        removed = 0
        for node in reversed(self.nodes):
            if all(not o._uses and not o._output_of for o in node.outputs):
                self.remove(node)
                removed += 1
        for name, v in list(self.constants.items()):
            if not v._uses and not v._output_of:
                del self.constants[name]
        return removed

    def sort(self) -> None:
        """Re-establish topological order (stable for already-sorted parts)."""
        order: list[Node] = []
        state: dict[Node, int] = {}
        members = self._nodes

        def visit(n: Node):
            stack = [(n, False)]
            while stack:
                cur, done = stack.pop()
                if done:
                    state[cur] = 2
                    order.append(cur)
                    continue
                if state.get(cur):
                    if state[cur] == 1:
                        raise ValueError(f"cycle through {cur!r}")
                    continue
                state[cur] = 1
                stack.append((cur, True))
                for dep in reversed(_dependencies(cur)):
                    if dep in members and not state.get(dep):
                        stack.append((dep, False))

        for n in list(self._nodes):
            if not state.get(n):
                visit(n)
        self._nodes = dict.fromkeys(order)

    def walk(self) -> Iterator[Node]:
        """All nodes, this graph's and (recursively) its subgraphs'."""
        for node in self._nodes:
            yield node
            for sub in node.subgraphs():
                yield from sub.walk()

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self._nodes)} nodes>"


def _dependencies(node: Node) -> list[Node]:
    deps = [v.producer for v in node.inputs if v is not None and v.producer is not None]
    for sub in node.subgraphs():  # values captured from enclosing scopes
        for inner in sub.walk():
            deps.extend(v.producer for v in inner.inputs if v is not None and v.producer is not None)
    return deps

"""Patterns that read like the math they match.

    x, w, eps = Var("x"), Var("w"), Const("eps")
    rms = ops.Mul(w, ops.Mul(x, ops.Reciprocal(ops.Sqrt(ops.Add(ops.ReduceMean(ops.Pow(x, 2.0)), eps)))))

`ops.Name(...)` matches a node of that op whose inputs match the arguments
(inputs not given are not checked); Add/Mul/And/Or/Equal/Max/Min match in
either operand order. `Var` binds any value (the same name must bind the same
value everywhere), `Const` a constant (a number matches a constant whose
elements all equal it), `AnyOf` tries alternatives, `Maybe(op, p)` matches
`op(p)` or `p` itself (an optional Cast, say). A failed match keeps the
reason, so a pass can say why a near miss did not fuse.

`NoMatch` is the one way every fusion reports a near miss: pattern, meaning
check and numeric proof (`region.equivalent`) all raise it with the reason,
and the pass records `str(e)` for `--explain`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import numpy as np

from ..ir.graph import Node, Value
from ..ir.ops import known_value

COMMUTATIVE = {"Add", "Mul", "And", "Or", "Equal", "Max", "Min", "Sum"}


class NoMatch(Exception):
    """A candidate that does not fuse (a near miss); the message says why."""


class Pattern:
    def match(self, value: Optional[Value], m: "Match") -> bool:
        raise NotImplementedError


@dataclasses.dataclass
class Var(Pattern):
    name: str
    where: Optional[Callable[[Value], bool]] = None

    def match(self, value, m):
        if value is None:
            return m.fail(f"{self.name}: missing input")
        if self.name in m.values and m.values[self.name] is not value:
            return m.fail(f"{self.name}: bound to %{m.values[self.name].name}, here %{value.name}")
        if self.where is not None and not self.where(value):
            return m.fail(f"{self.name}: %{value.name} does not satisfy its condition")
        m.values[self.name] = value
        return True


@dataclasses.dataclass
class Const(Pattern):
    name: Optional[str] = None
    value: Optional[float] = None      # when set: every element must equal it
    rtol: float = 1e-6

    def match(self, value, m):
        arr = known_value(value) if value is not None else None
        if arr is None or arr.dtype == object:
            return m.fail(f"{self.name or self.value}: %{getattr(value, 'name', '?')} is not a constant")
        if self.value is not None and not (arr.size and np.allclose(arr.astype(np.float64), self.value,
                                                                      rtol=self.rtol, atol=0)):
            return m.fail(f"constant %{value.name} is not {self.value}")
        if self.name:
            m.values[self.name] = value
            m.consts[self.name] = arr
        return True


@dataclasses.dataclass
class Op(Pattern):
    op_type: str
    args: tuple[Pattern, ...]
    name: Optional[str] = None          # binds the matched node
    attrs: Optional[dict[str, Any]] = None
    domain: str = ""

    def match(self, value, m):
        node = value.producer if value is not None else None
        if node is None or node.op_type != self.op_type or node.domain != self.domain:
            got = node.qualified_op if node is not None else "no producer"
            return m.fail(f"%{getattr(value, 'name', '?')}: expected {self.op_type}, found {got}")
        for k, want in (self.attrs or {}).items():
            have = node.attrs.get(k)
            if callable(want) and not want(have) or not callable(want) and have != want:
                return m.fail(f"{node.name}: attribute {k}={have!r} does not match")
        if len(node.inputs) < len(self.args):
            return m.fail(f"{node.name}: {len(node.inputs)} inputs, pattern wants {len(self.args)}")
        orders = [self.args]
        if self.op_type in COMMUTATIVE and len(self.args) == 2:
            orders.append(self.args[::-1])
        best = None
        for args in orders:
            trial = m.branch()
            if all(p.match(v, trial) for p, v in zip(args, node.inputs)):
                m.adopt(trial)
                m.nodes.append(node)
                if self.name:
                    m.node_of[self.name] = node
                return True
            if best is None or len(trial.nodes) > len(best.nodes):
                best = trial    # report the operand order that got furthest (ties: the written order)
        m.reason = best.reason
        return False


@dataclasses.dataclass
class AnyOf(Pattern):
    alternatives: tuple[Pattern, ...]
    tag: Optional[str] = None           # binds the index of the alternative that matched

    def match(self, value, m):
        reasons = []
        for i, p in enumerate(self.alternatives):
            trial = m.branch()
            if p.match(value, trial):
                m.adopt(trial)
                if self.tag:
                    m.tags[self.tag] = i
                return True
            reasons.append(trial.reason)
        return m.fail(" / ".join(r for r in reasons if r))


def Maybe(op_type: str, inner: Pattern, **kw) -> Pattern:
    return AnyOf((Op(op_type, (inner,), **kw), inner))


class _OpBuilder:
    """`ops.Mul(a, b)` -> Op("Mul", (a, b)); numbers become `Const(value=...)`."""

    def __getattr__(self, op_type: str):
        def build(*args, name=None, attrs=None, domain=""):
            return Op(op_type, tuple(_lift(a) for a in args), name, attrs, domain)
        return build


ops = _OpBuilder()


def _lift(a: Union[Pattern, float, int]) -> Pattern:
    return a if isinstance(a, Pattern) else Const(value=float(a))


@dataclasses.dataclass
class Match:
    values: dict[str, Value] = dataclasses.field(default_factory=dict)
    consts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    node_of: dict[str, Node] = dataclasses.field(default_factory=dict)
    tags: dict[str, int] = dataclasses.field(default_factory=dict)
    nodes: list[Node] = dataclasses.field(default_factory=list)
    reason: str = ""

    def fail(self, reason: str) -> bool:
        self.reason = reason
        return False

    def branch(self) -> "Match":
        return Match(dict(self.values), dict(self.consts), dict(self.node_of), dict(self.tags), list(self.nodes))

    def adopt(self, other: "Match") -> None:
        self.values, self.consts, self.node_of = other.values, other.consts, other.node_of
        self.tags, self.nodes, self.reason = other.tags, other.nodes, other.reason

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def interior_is_private(self, root: Node) -> bool:
        """Every matched node but the root is used only inside the match (safe to replace)."""
        inside = set(map(id, self.nodes))
        for n in self.nodes:
            if n is root:
                continue
            for o in n.outputs:
                if o.is_graph_output or any(id(u) not in inside for u, _ in o.uses):
                    return False
        return True


def match(pattern: Pattern, value: Value) -> Match:
    """The match rooted at `value`; raises NoMatch with why it failed."""
    m = Match()
    if pattern.match(value, m):
        return m
    raise NoMatch(m.reason)

"""Passes and the pass manager.

A pass is a named function Graph -> PassResult that edits the graph in place
and reports what it did (counts per kind, e.g. {"Attention": 2}). The manager
runs an explicit list of passes, verifies the IR after each, times each, and
hands the IR before and after every pass to an `on_stage` callback (how
`--dump-ir` shows each step).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Iterable, Optional

from ..ir.graph import Graph
from ..ir.printer import format_graph
from ..ir.verifier import verify


@dataclasses.dataclass
class PassResult:
    modified: bool = False
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    notes: list[str] = dataclasses.field(default_factory=list)   # why near misses did not fire

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n
        self.modified = self.modified or n > 0


@dataclasses.dataclass
class Pass:
    name: str
    run: Callable[[Graph], PassResult]
    doc: str = ""


_PASSES: dict[str, Pass] = {}


def register_pass(name: str):
    """Decorator: `@register_pass("fuse-rmsnorm") def fuse_rmsnorm(graph) -> PassResult`."""
    def wrap(fn: Callable[[Graph], PassResult]):
        _PASSES[name] = Pass(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn
    return wrap


def get_pass(name: str) -> Pass:
    from . import pipelines  # noqa: F401 - registers every pass
    try:
        return _PASSES[name]
    except KeyError:
        from ..errors import PolyportError
        raise PolyportError(f"unknown pass {name!r}; known: {', '.join(sorted(_PASSES))}") from None


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    counts: dict[str, int]
    notes: list[str]


StageCallback = Callable[[str, Graph], None]   # (stage name, graph) after each step


class PassManager:
    def __init__(self, passes: Iterable[Pass | str], *, verify_each: bool = True,
                 on_stage: Optional[StageCallback] = None):
        self.passes = [get_pass(p) if isinstance(p, str) else p for p in passes]
        self.verify_each = verify_each
        self.on_stage = on_stage
        self.records: list[PassRecord] = []

    def run(self, graph: Graph) -> Graph:
        if self.on_stage:
            self.on_stage("input", graph)
        for p in self.passes:
            before = len(graph)
            start = time.perf_counter()
            result = p.run(graph)
            seconds = time.perf_counter() - start
            if self.verify_each:
                verify(graph)
            self.records.append(PassRecord(p.name, seconds, before, len(graph), dict(result.counts), result.notes))
            if self.on_stage:
                self.on_stage(f"after {p.name}", graph)
        return graph

    def summary(self, explain: bool = False) -> str:
        """A table of passes: time, node counts, what changed (and, with `explain`, near misses)."""
        lines = [f"{'pass':<24} {'ms':>8} {'nodes':>13}  changes"]
        for r in self.records:
            changes = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items())) or "-"
            lines.append(f"{r.name:<24} {r.seconds * 1e3:8.1f} {r.nodes_before:>6}->{r.nodes_after:<6}  {changes}")
            if explain:
                lines.extend(f"    not fused: {n}" for n in r.notes)
        return "\n".join(lines)


def stage_dumper(texts: list[str]) -> StageCallback:
    """An `on_stage` callback collecting each stage's IR text under a header."""
    def dump(stage: str, graph: Graph) -> None:
        texts.append(f"# ---- {stage}\n{format_graph(graph)}\n")
    return dump

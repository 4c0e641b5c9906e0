"""Passes and the pass manager.

A pass is a named function Graph -> PassResult that edits the graph in place
and reports what it did (counts per kind, e.g. {"Attention": 2}). The manager
runs an explicit list of passes, verifies the IR after each, times each, and
can dump the IR text before and after every pass (`--dump-ir DIR`).
"""
from __future__ import annotations

import collections
import dataclasses
import os
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


class PassManager:
    def __init__(self, passes: Iterable[Pass | str], *, verify_each: bool = True,
                 dump_dir: Optional[str] = None, explain: bool = False):
        self.passes = [get_pass(p) if isinstance(p, str) else p for p in passes]
        self.verify_each = verify_each
        self.dump_dir = dump_dir
        self.explain = explain
        self.records: list[PassRecord] = []

    def run(self, graph: Graph) -> Graph:
        if self.dump_dir:
            os.makedirs(self.dump_dir, exist_ok=True)
            self._dump(graph, f"00-input.ir")
        for i, p in enumerate(self.passes, 1):
            before = len(graph)
            start = time.perf_counter()
            result = p.run(graph)
            seconds = time.perf_counter() - start
            if self.verify_each:
                verify(graph)
            self.records.append(PassRecord(p.name, seconds, before, len(graph), dict(result.counts), result.notes))
            if self.dump_dir:
                self._dump(graph, f"{i:02d}-after-{p.name}.ir")
        return graph

    def _dump(self, graph: Graph, name: str) -> None:
        with open(os.path.join(self.dump_dir, name), "w") as f:
            f.write(format_graph(graph) + "\n")

    def summary(self) -> str:
        lines = [f"{'pass':<24} {'ms':>8} {'nodes':>13}  changes"]
        for r in self.records:
            changes = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items())) or "-"
            lines.append(f"{r.name:<24} {r.seconds * 1e3:8.1f} {r.nodes_before:>6}->{r.nodes_after:<6}  {changes}")
            if self.explain:
                lines.extend(f"    not fused: {n}" for n in r.notes)
        return "\n".join(lines)

"""Imports flow one way: cli -> compiler -> passes / targets -> ir, and the runtime imports no compiler module.

Reads every module's imports (function-level ones too: a lazy import is still a dependency) and
checks them at the level of polyport's packages (`ir`, `passes`, ...; a top-level module such as
`compiler.py` is its own package). The package root only re-exports lazily, so it is not a node.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "examples", "benchmarks", "scripts", "build"}
COMPILER = {"compiler", "cli", "passes", "targets", "frontend", "backend"}


def _package_of(parts: tuple[str, ...]) -> str | None:
    return parts[0].removesuffix(".py") if parts else None


def package_imports(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """{package: {imported package: 'module:line' of one import}} for polyport's own imports."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in SKIP or rel[0].startswith(".") or rel == ("__init__.py",) or rel == ("setup.py",):
            continue
        src = _package_of(rel)
        module = list(rel[:-1]) + ([] if rel[-1] == "__init__.py" else [rel[-1].removesuffix(".py")])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module[:len(module) - node.level + (rel[-1] == "__init__.py")]
                    target = base + (node.module.split(".") if node.module else [])
                elif node.module and node.module.split(".")[0] == "polyport":
                    target = node.module.split(".")[1:]
                else:
                    continue
                targets = [target + [a.name] if not target else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "polyport"]
            for target in targets:
                dst = _package_of(tuple(target))
                if dst and dst != src and (dst in {p.stem for p in root.iterdir()}):
                    graph.setdefault(src, {}).setdefault(dst, f"{'/'.join(rel)}:{node.lineno}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one package."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_runtime_imports_no_compiler_module():
    graph = package_imports()
    bad = {dst: where for dst, where in graph.get("runtime", {}).items() if dst in COMPILER}
    assert not bad, f"runtime imports compiler packages: {bad}"


def test_the_ir_imports_only_itself():
    graph = package_imports()
    bad = {dst: where for dst, where in graph.get("ir", {}).items() if dst != "errors"}
    assert not bad, f"ir imports: {bad}"


def test_no_cycles_between_packages():
    graph = package_imports()
    found = cycles(graph)
    detail = [{v: {w: graph[v][w] for w in c if w in graph.get(v, {})} for v in c} for c in found]
    assert not found, f"import cycles between packages: {detail}"


def test_the_checks_catch_a_runtime_to_targets_import_and_a_cycle(tmp_path):
    for pkg, text in {"runtime": "from ..targets.base import Target\n", "targets": "from ..ir import graph\n",
                      "ir": "def f():\n    from ..targets import base\n"}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "m.py").write_text(text)
    graph = package_imports(tmp_path)
    assert graph["runtime"] == {"targets": "runtime/m.py:1"}
    assert cycles(graph) == [["ir", "targets"]]

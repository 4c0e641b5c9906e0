"""`polyport.backend.cpu`: the ONNX backend API over import -> default passes -> cpu build -> Relax VM.

Usable as `onnx.backend.test.BackendTest(polyport.backend.cpu, __name__)`. The
build is the cpu target's own (`CpuTarget.build`) and the session its own
(`CpuSession`); only the artifact files are skipped: the executable and the
weights stay in memory. An op the cpu target cannot lower fails `prepare` with
its `UnsupportedOpError` (node, op, reason); nothing falls back to another executor.
"""
from __future__ import annotations

from ..compiler import signature
from ..ir.graph import Graph
from ..passes.pipelines import run_pipeline
from ..runtime.cpu_session import CpuSession
from ..targets.base import CompileOptions, get_target
from ._common import make_backend


def cpu_session(graph: Graph, pipeline: str = "default") -> CpuSession:
    """Compile an imported graph for the host CPU and open a session over the build."""
    run_pipeline(graph, pipeline)
    executable, meta, _ = get_target("cpu").build(graph, CompileOptions())
    weights = {v.name: v.const for v in graph.constants.values()}
    return CpuSession.from_executable(executable, meta, weights, signature(graph, graph.name or "model"))


CpuBackend = make_backend("CpuBackend", cpu_session)

is_compatible = CpuBackend.is_compatible
prepare = CpuBackend.prepare
run_model = CpuBackend.run_model
run_node = CpuBackend.run_node
supports_device = CpuBackend.supports_device

"""The compile driver: ONNX -> IR -> default passes -> each target's lowering -> one artifact."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import diagnostics, interrupts
from .frontend.onnx_import import import_onnx
from .ir.graph import Graph
from .ir.index_inputs import index_ranges
from .ir.types import TensorType
from .passes.pipelines import run_pipeline
from .runtime.artifact import ArtifactWriter, check_output, sha256
from .runtime.cost import manifest_cost
from .errors import PolyportError
from .targets.base import CompileOptions, Target, get_target, target_names

Progress = Callable[[str], None]


def signature(graph: Graph, name: str) -> dict:
    """The model's interface as the manifest records it (dims as text: `seq`, `seq + 1`)."""
    def spec(v):
        t = v.type
        assert isinstance(t, TensorType), f"{v.name}: only tensor inputs and outputs can be compiled ({t})"
        return {"name": v.name, "dtype": str(t.dtype),
                "shape": None if t.shape is None else [None if d is None else str(d) for d in t.shape]}
    symbols = sorted({s for v in graph.inputs if isinstance(v.type, TensorType) for s in v.type.symbols})
    inputs = [spec(v) for v in graph.inputs]
    ranges = index_ranges(graph)
    for s in inputs:
        if s["name"] in ranges:
            s["index_range"] = list(ranges[s["name"]])    # inclusive; every session checks feeds against it
    return {"name": name, "inputs": inputs, "outputs": [spec(v) for v in graph.outputs], "symbols": symbols}


def check_archs(archs: Sequence[str], lowerers: Sequence[Target]) -> None:
    """Every --arch must name an architecture of one of the targets compiled (it would be ignored otherwise)."""
    names = ", ".join(t.name for t in lowerers)
    for arch in archs:
        if any(arch in t.known_archs for t in lowerers):
            continue
        owner = next((n for n in target_names() if arch in get_target(n).known_archs), None)
        if owner is not None:
            raise PolyportError(f"--arch {arch} is a {owner} architecture; it does not apply to --target {names}")
        known = "; ".join(f"{n}: {', '.join(get_target(n).known_archs)}" for n in target_names()
                          if get_target(n).known_archs)
        raise PolyportError(f"--arch {arch} is not an architecture of --target {names} (cpu builds for this "
                            f"machine's CPU and takes no --arch; known: {known})")


def compile_model(model: str | os.PathLike, targets: Sequence[str], out: str | os.PathLike, *,
                  pipeline: str = "default", options: Optional[CompileOptions] = None,
                  on_stage=None, progress: Progress = lambda msg: None, replace: bool = False) -> Path:
    """Compile `model` for `targets` into the artifact directory `out`.

    An existing artifact of the same model keeps its other targets; one of another model is replaced only
    with `replace` (see ArtifactWriter). Each target's warnings (Python and TVM's native ones) are reported
    through `progress` as one summary line. Ctrl-C stops at the next step (interrupts.deferred) and leaves
    neither an artifact nor a temporary directory."""
    options = options or CompileOptions()
    lowerers = [get_target(t) for t in targets]            # unknown targets and archs fail before any work
    for target in lowerers:
        target.check_options(options)
    check_archs(options.archs, lowerers)
    check_output(out)                                      # so do output paths that would lose data
    with interrupts.deferred() as checkpoint:
        def step(message: str) -> None:
            checkpoint()
            progress(message)

        def stage(name, graph) -> None:
            checkpoint()
            if on_stage is not None:
                on_stage(name, graph)

        step(f"importing {model}")
        graph = import_onnx(model)
        step(f"running the {pipeline!r} pipeline")
        run_pipeline(graph, pipeline, on_stage=stage)
        weights = {v.name: v.const for v in graph.constants.values()}
        with ArtifactWriter(out, signature(graph, Path(model).stem), source=sha256(Path(model)),
                            targets=[t.name for t in lowerers], replace=replace) as writer:
            writer.write_weights(weights)
            dropped = writer.existing()[1]
            if dropped:
                progress(f"replacing {out}, an artifact of another model: its {', '.join(dropped)} "
                         "target(s) are dropped")
            writer.manifest["cost"] = manifest_cost(graph)   # FLOPs/bytes polynomials for the roofline (bench)
            for target in lowerers:
                step(f"lowering for {target.name}")
                with diagnostics.captured() as found:
                    entry = target.lower(graph, writer.target_dir(target.name), weights, options)
                if found:
                    progress(diagnostics.summary(target.name, found))
                writer.add_target(target.name, entry)
            step(f"writing {out}")
            return writer.commit()

"""The compile driver: ONNX -> IR -> default passes -> each target's lowering -> one artifact."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import PolyportError
from .frontend.onnx_import import import_onnx
from .ir.graph import Graph
from .ir.types import TensorType
from .passes.derive_generation import derive_generation, generation_entry
from .passes.pipelines import run_pipeline
from .runtime.artifact import ArtifactWriter
from .runtime.cost import manifest_cost
from .targets.base import CompileOptions, get_target

Progress = Callable[[str], None]


def signature(graph: Graph, name: str) -> dict:
    """The model's interface as the manifest records it (dims as text: `seq`, `seq + 1`)."""
    def spec(v):
        t = v.type
        assert isinstance(t, TensorType), f"{v.name}: only tensor inputs and outputs can be compiled ({t})"
        return {"name": v.name, "dtype": str(t.dtype),
                "shape": None if t.shape is None else [None if d is None else str(d) for d in t.shape]}
    symbols = sorted({s for v in graph.inputs if isinstance(v.type, TensorType) for s in v.type.symbols})
    return {"name": name, "inputs": [spec(v) for v in graph.inputs], "outputs": [spec(v) for v in graph.outputs],
            "symbols": symbols}


TOKENIZER = "tokenizer.json"


def check_tokenizer(path: str | os.PathLike) -> None:
    """A one-line error, before any work, for a tokenizer file the tokenizers package cannot read."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PolyportError("--tokenizer needs the tokenizers package (pip install tokenizers)") from None
    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for any bad file
        raise PolyportError(f"--tokenizer {path}: not a readable tokenizers JSON file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def compile_model(model: str | os.PathLike, targets: Sequence[str], out: str | os.PathLike, *,
                  pipeline: str = "default", options: Optional[CompileOptions] = None,
                  on_stage=None, progress: Progress = lambda msg: None,
                  tokenizer: str | os.PathLike | None = None) -> Path:
    """Compile `model` for `targets` into the artifact directory `out` (added to it if it exists);
    `tokenizer` (a Hugging Face tokenizers JSON file) is stored for `generate --prompt`."""
    options = options or CompileOptions()
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    lowerers = [get_target(t) for t in targets]            # unknown targets and archs fail before any work
    for target in lowerers:
        target.check_options(options)
    progress(f"importing {model}")
    graph = import_onnx(model)
    progress(f"running the {pipeline!r} pipeline")
    run_pipeline(graph, pipeline, on_stage=on_stage)
    programs = derive_generation(graph)                     # before lowering: targets may rewrite the graph
    for name in programs.uncached:
        progress(f"generation: {name} cannot be cached; generation will recompute the whole sequence")
    weights = {v.name: v.const for v in graph.constants.values()}
    weights.update(programs.added_constants())              # the programs share the rest with the graph
    name = Path(model).stem
    with ArtifactWriter(out, signature(graph, name)) as writer:
        writer.write_weights(weights)
        writer.manifest["cost"] = manifest_cost(graph)       # FLOPs/bytes polynomials for the roofline (bench)
        writer.manifest["generation"] = generation_entry(graph, programs)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, writer.tmp / TOKENIZER)
            writer.manifest["tokenizer"] = TOKENIZER
        for target in lowerers:
            progress(f"lowering for {target.name}")
            out_dir = writer.target_dir(target.name)
            entry = target.lower(graph, out_dir, weights, options)
            if not programs.uncached:
                entry.update(target.lower_generation(graph, programs, out_dir, weights, options) or {})
            writer.add_target(target.name, entry)
        progress(f"writing {out}")
        return writer.commit()

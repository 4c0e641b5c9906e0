"""The compile driver: ONNX -> IR -> default passes -> each target's lowering -> one artifact."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from .frontend.onnx_import import import_onnx
from .ir.graph import Graph
from .ir.types import TensorType
from .passes.pipelines import run_pipeline
from .errors import PolyportError
from .ir.quant_layout import FLOAT16
from .passes.quantize_weights import WeightQuantization, quantize_weights
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


def compile_model(model: str | os.PathLike, targets: Sequence[str], out: str | os.PathLike, *,
                  pipeline: str = "default", options: Optional[CompileOptions] = None,
                  quantization: Optional[WeightQuantization] = None,
                  on_stage=None, progress: Progress = lambda msg: None) -> Path:
    """Compile `model` for `targets` into the artifact directory `out` (added to it if it exists);
    with `quantization`, its linear weights are stored and computed as quantized codes."""
    options = options or CompileOptions()
    if "ascend" in targets and (quantization is not None or (options.dtype in FLOAT16 and len(targets) > 1)):
        raise PolyportError("ascend: compile it on its own, without --quantize (its weights are converted by its "
                            "own f16 lowering; CANN's antiquant matmuls are not planned yet)")
    if options.dtype in FLOAT16 and "ascend" not in targets:   # TVM targets: 16-bit linear weights, f32 compute
        if quantization is not None:
            raise PolyportError(f"--dtype {options.dtype} and --quantize {quantization.scheme} exclude each other")
        quantization = WeightQuantization(options.dtype, lm_head=True)
    lowerers = [get_target(t) for t in targets]            # unknown targets and archs fail before any work
    for target in lowerers:
        target.check_options(options)
    progress(f"importing {model}")
    graph = import_onnx(model)
    progress(f"running the {pipeline!r} pipeline")
    run_pipeline(graph, pipeline, on_stage=on_stage)
    quant_entry = None
    if quantization is not None:
        progress(f"quantizing weights ({quantization.scheme}, groups of {quantization.group_size})")
        quant_entry = quantize_weights(graph, quantization)
        if on_stage is not None:
            on_stage(f"quantize-{quantization.scheme}", graph)
    weights = {v.name: v.const for v in graph.constants.values()}
    name = Path(model).stem
    with ArtifactWriter(out, signature(graph, name)) as writer:
        writer.write_weights(weights)
        writer.manifest["cost"] = manifest_cost(graph)       # FLOPs/bytes polynomials for the roofline (bench)
        if quant_entry is not None:
            writer.manifest["quantization"] = quant_entry
        for target in lowerers:
            progress(f"lowering for {target.name}")
            entry = target.lower(graph, writer.target_dir(target.name), weights, options)
            writer.add_target(target.name, entry)
        progress(f"writing {out}")
        return writer.commit()

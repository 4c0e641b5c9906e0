"""The compile driver: ONNX -> IR -> default passes -> each target's lowering -> one artifact."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import diagnostics, interrupts
from .errors import PolyportError
from .frontend.onnx_import import import_onnx
from .ir.graph import Graph
from .ir.index_inputs import index_ranges
from .ir.quant_layout import FLOAT16
from .ir.types import TensorType
from .passes.compute_dtype import set_compute_dtype
from .passes.derive_generation import derive_generation, generation_entry, without_programs
from .passes.pipelines import run_pipeline
from .passes.quantize_weights import WeightQuantization, quantize_weights
from .runtime.artifact import ArtifactWriter, check_output, sha256
from .runtime.cost import manifest_cost
from .runtime.reference import ReferenceGenerator
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


TOKENIZER = "tokenizer.json"
NO_GENERATION = "compiled without generation programs (compile --no-generation)"


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


def reference_generator(model: str | os.PathLike, pipeline: str = "default") -> ReferenceGenerator:
    """Generation on the reference executor for an ONNX model: import, passes, derived programs."""
    graph = import_onnx(model)
    run_pipeline(graph, pipeline)
    programs = derive_generation(graph)
    return ReferenceGenerator(graph, programs, generation_entry(graph, programs))


def _derived(graph: Graph, lowerers: Sequence[Target]):
    """The generation programs, batch-generic unless a target builds batch-1 programs only (then every
    target of the artifact shares the batch-1 programs, and the manifest says why)."""
    single = [t.name for t in lowerers if not t.batched_programs]
    programs = derive_generation(graph, batch_generic=not single)
    if single and programs.prefill is not None and programs.per_sequence is None:
        programs.per_sequence = f"the {', '.join(single)} target builds programs of batch 1 only"
    return programs


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


def compute_dtype(lowerers: Sequence[Target], options: CompileOptions) -> str:
    """The activations' dtype of the graph every target of one artifact lowers (they share the graph and
    the weights file); a one-line error where two targets want different ones."""
    wanted = {t.name: t.compute_dtype(options) for t in lowerers}
    dtypes = {d for d in wanted.values() if d is not None}
    if len(dtypes) > 1:
        said = ", ".join(f"{name} in {d}" for name, d in wanted.items() if d is not None)
        raise PolyportError(f"--dtype {options.dtype}: the targets compute in different dtypes ({said}); compile "
                            "them into separate artifacts")
    return dtypes.pop() if dtypes else "f32"


def compile_model(model: str | os.PathLike, targets: Sequence[str], out: str | os.PathLike, *,
                  pipeline: str = "default", options: Optional[CompileOptions] = None,
                  quantization: Optional[WeightQuantization] = None,
                  on_stage=None, progress: Progress = lambda msg: None, replace: bool = False,
                  tokenizer: str | os.PathLike | None = None, generation: bool = True) -> Path:
    """Compile `model` for `targets` into the artifact directory `out`.

    An existing artifact of the same model keeps its other targets; one of another model is replaced only
    with `replace` (see ArtifactWriter). With `quantization`, its linear weights are stored and computed
    as quantized codes. `tokenizer` (a Hugging Face tokenizers JSON file) is stored for
    `generate --prompt`. Without `generation` no prefill / decode programs are derived or built (the
    cache-less program compiles about 3x faster on cpu; the manifest says generation recomputes). Each target's warnings (Python and TVM's native ones) are reported through
    `progress` as one summary line. Ctrl-C stops at the next step (interrupts.deferred) and leaves
    neither an artifact nor a temporary directory."""
    options = options or CompileOptions()
    if "ascend" in targets and options.dtype in FLOAT16 and len(targets) > 1:
        raise PolyportError("ascend: compile it on its own with --dtype (its weights are converted by its "
                            "own f16 / bf16 lowering)")
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    lowerers = [get_target(t) for t in targets]            # unknown targets and archs fail before any work
    for target in lowerers:
        target.check_options(options)
    compute = compute_dtype(lowerers, options)
    if options.dtype in FLOAT16 and "ascend" not in targets:
        if quantization is not None and quantization.scheme != options.dtype:
            raise PolyportError(f"--dtype {options.dtype} and --quantize {quantization.scheme} exclude each other")
        if compute == "f32":          # 16-bit linear weights (the embedding table too, if asked), f32 compute
            quantization = quantization or WeightQuantization(options.dtype, lm_head=True)
        else:                         # 16-bit compute stores every weight, the table too, in it (compute_dtype.py)
            quantization = None
    elif quantization is not None and quantization.scheme in FLOAT16:
        if options.dtype != quantization.scheme:
            raise PolyportError(f"{quantization.scheme} weights need --dtype {quantization.scheme}")
        quantization = None            # ascend: its own f16 / bf16 lowering stores every weight, the table too
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
        quant_entry = None
        if quantization is not None:
            step(f"quantizing weights ({quantization.scheme}, groups of {quantization.group_size})")
            quant_entry = quantize_weights(graph, quantization)
            stage(f"quantize-{quantization.scheme}", graph)
        compute_entry = None
        if compute in FLOAT16:
            step(f"computing activations in {compute} (f32 accumulation)")
            compute_entry = set_compute_dtype(graph, compute)
            stage(f"compute-{compute}", graph)
        programs = (_derived(graph, lowerers) if generation    # before lowering: targets may rewrite the graph
                    else without_programs(graph, NO_GENERATION))
        for name in programs.uncached:
            progress(f"generation: {name} cannot be cached; generation will recompute the whole sequence")
        weights = {v.name: v.const for v in graph.constants.values()}
        weights.update(programs.added_constants())          # the programs share the rest with the graph
        with ArtifactWriter(out, signature(graph, Path(model).stem), source=sha256(Path(model)),
                            targets=[t.name for t in lowerers], replace=replace) as writer:
            writer.write_weights(weights)
            dropped = writer.existing()[1]
            if dropped:
                progress(f"replacing {out}, an artifact of another model: its {', '.join(dropped)} "
                         "target(s) are dropped")
            writer.manifest["cost"] = manifest_cost(graph)   # FLOPs/bytes polynomials for the roofline (bench)
            writer.manifest["generation"] = generation_entry(graph, programs)
            if quant_entry is not None:
                writer.manifest["quantization"] = quant_entry
            if compute_entry is not None:
                writer.manifest["compute"] = compute_entry
            if tokenizer is not None:
                shutil.copyfile(tokenizer, writer.tmp / TOKENIZER)
                writer.manifest["tokenizer"] = TOKENIZER
            for target in lowerers:
                step(f"lowering for {target.name}")
                out_dir = writer.target_dir(target.name)
                derived = programs.prefill is not None
                if derived and programs.compressed_decode and not target.decodes_compressed:
                    progress(f"generation: {target.name}: {programs.compressed_decode}")
                    derived = False
                with diagnostics.captured() as found:
                    entry = target.lower(graph, out_dir, weights, options, programs=programs if derived else None)
                if found:
                    progress(diagnostics.summary(target.name, found))
                writer.add_target(target.name, entry)
            step(f"writing {out}")
            return writer.commit()

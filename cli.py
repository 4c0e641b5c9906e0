"""The `polyport` command line.

    polyport inspect MODEL [--json] [--dump-ir FILE]
    polyport run MODEL (--input NAME=FILE.npy ... | --seq N) [--output OUT.npz] [--dump-ir FILE]
    polyport bench ART [--target T ...] [--seq N ...] [--runs N] [--warmup N] [--device NAME] [--json FILE]
    polyport bench ART --decode [--context N ...]   (time to first token, time per output token)
    polyport report FILE.json ... [--plot FILE.png] [--baseline FILE.json [--fail-if-slower PCT]]

Every failure the user can cause (a bad model file, an unsupported op, a wrong
input, a bad argument) is printed as one line, `polyport: error: <message>`, on
stderr with exit status 2. Anything else is a bug in polyport and keeps its
traceback; `--debug` (or POLYPORT_DEBUG=1) shows the traceback for user errors
too. Files are written atomically: a failed command leaves no half-written file.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import zipfile
from typing import Any, Mapping, Optional, Sequence

import click
import numpy as np

from . import __version__, errors
from .files import atomic_write, check_writable

EXIT_USER_ERROR = 2


class _Group(click.Group):
    """A click group whose errors are one line on stderr (see the module docstring)."""

    debug = False  # set by the --debug option before any command runs

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        _Group.debug = False
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        interrupted = False
        try:
            rv = super().main(args, prog_name or "polyport", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:     # `polyport` alone: the help, as click prints it
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.UsageError as e:     # bad options or arguments: never a traceback
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            _fail(e.format_message() + hint)
        except click.ClickException as e:
            if _Group.debug:
                raise
            _fail(e.format_message())
        except errors.PolyportError as e:
            if _Group.debug:
                raise
            _fail(str(e))
        except click.Abort:
            interrupted = True
        if interrupted:
            # The interrupted frames (a TVM BlockBuilder mid-function) are freed now, so whatever TVM logs
            # as they go comes before the last line, not after it at exit.
            gc.collect()
            click.echo("polyport: interrupted", err=True)
            # os._exit, not sys.exit: a KeyboardInterrupt raised inside code that a C extension ran through
            # PyRun_* leaves CPython's "unhandled interrupt" flag set, and the interpreter would then end
            # by killing itself with SIGINT (status -2) however the exception was handled. The artifact's
            # temporary directory is gone by now, and stdio is flushed first.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)   # click returns an int for --help / --version


def _fail(message: str) -> None:
    click.echo(f"polyport: error: {_one_line(message)}", err=True)
    sys.exit(EXIT_USER_ERROR)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


@click.group(name="polyport", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="polyport", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, envvar="POLYPORT_DEBUG",
              help="Show the full traceback of user errors (bad files, unsupported ops, wrong inputs).")
def main(debug: bool) -> None:
    """polyport: one ONNX model in, artifacts for CPU, CUDA, ROCm and Ascend out.

    inspect a model (import, passes, fusion counts), run it on the NumPy reference
    executor or a compiled artifact, compile it for cpu, cuda, rocm and ascend (the
    ascend part emulated on CPU), and bench or compare artifacts."""
    _Group.debug = debug


PASSES_OPTION = click.option("--passes", default="none", show_default=True, metavar="PIPELINE",
                             help="Pass pipeline to run after import: none | canonicalize | default | generate "
                                  "(default, then the derived KV-cache prefill/decode programs).")
EXPLAIN_OPTION = click.option("--explain", is_flag=True,
                              help="Print what each pass did and why near misses did not fuse (stderr).")
DUMP_IR_OPTION = click.option("--dump-ir", type=click.Path(dir_okay=False), metavar="FILE",
                              help="Write the IR (text form) to FILE: as imported, then after each pass.")


# ---- inspect -------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@PASSES_OPTION
@EXPLAIN_OPTION
@DUMP_IR_OPTION
def inspect(model: str, as_json: bool, passes: str, explain: bool, dump_ir: Optional[str]) -> None:
    """Show a model's signature, ops and parameters.

    Inputs and outputs with their symbolic dims, the op histogram over all nodes
    (subgraphs included), the weight count and the opsets; with --passes, after
    that pipeline (fused ops under their names: Attention, MoE, RMSNorm, ...)."""
    from .ir.stats import graph_stats
    graph = _import(model, dump_ir, passes, explain)
    stats = graph_stats(graph)
    programs = None
    if passes == "generate":
        from .passes.derive_generation import derive_generation
        programs = derive_generation(graph)
    if as_json:
        click.echo(json.dumps({**stats, "generation": programs.manifest()} if programs else stats, indent=2))
        return
    click.echo(format_stats(stats, model))
    if programs is not None:
        from .ir.printer import format_graph
        for program in (programs.prefill, programs.decode):
            if program is not None:
                click.echo(format_graph(program))
        click.echo(programs.describe())


def format_stats(stats: Mapping[str, Any], source: str) -> str:
    """The human-readable form of `graph_stats` (what `polyport inspect` prints)."""
    lines = [f"model       {source}"]
    if stats["metadata"].get("producer"):
        lines.append(f"producer    {stats['metadata']['producer']}")
    lines.append("opsets      " + (", ".join(f"{d} {v}" for d, v in stats["opsets"].items()) or "-"))
    lines.append("symbols     " + (", ".join(stats["symbols"]) or "- (all input shapes are static)"))
    width = max((len(v["name"]) for v in stats["inputs"] + stats["outputs"]), default=0)
    for title in ("inputs", "outputs"):
        lines.append(title)
        for v in stats[title]:
            lines.append(f"  {v['name']:<{width}}  {_type_text(v)}")
    params = stats["parameters"]
    lines.append(f"parameters  {human_count(params)} ({params:,} weights; constants take "
                 f"{human_bytes(stats['parameter_bytes'])})")
    ops = stats["ops"]
    lines.append(f"nodes       {stats['nodes']:,} ({len(ops)} op types)")
    width = max((len(op) for op in ops), default=0)
    lines.extend(f"  {op:<{width}}  {count:>6,}" for op, count in ops.items())
    return "\n".join(lines)


def _type_text(v: Mapping[str, Any]) -> str:
    dtype = v["dtype"] or "?"
    if v["shape"] is None:
        return f"{dtype}[*]" if v["dtype"] is None or "<" not in dtype else dtype
    return f"{dtype}[{', '.join('?' if d is None else str(d) for d in v['shape'])}]"


def human_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


# ---- run -----------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path())   # an ONNX file, or an artifact directory (with --target)
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=FILE.npy",
              help="A model input from a .npy file; repeat for each input.")
@click.option("--seq", type=int, callback=lambda ctx, param, n: _positive(n), metavar="N",
              help="Instead of --input: deterministic inputs (seed 0) with every symbolic dim set to N "
                   "(integers in [0, 100) for integer inputs, e.g. token ids; standard normal for floats).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), metavar="OUT.npz",
              help="Save the outputs, under their graph names, to an .npz archive.")
@PASSES_OPTION
@EXPLAIN_OPTION
@DUMP_IR_OPTION
@click.option("--target", "-t", default=None, metavar="TARGET",
              help="With an artifact directory: the target to run (default cpu).")
def run(model: str, inputs: tuple[str, ...], seq: Optional[int], output: Optional[str], passes: str,
        explain: bool, dump_ir: Optional[str], target: Optional[str]) -> None:
    """Run an ONNX model on the reference executor, or an artifact (a directory) on a target.

    Prints each output's type and min / max / mean; --output saves them."""
    if inputs and seq is not None:
        raise click.UsageError("give either --input NAME=FILE.npy ... or --seq N, not both")
    feeds = load_inputs(inputs)            # argument errors first, before a long import
    if output is not None:
        check_writable(output)
    if os.path.isdir(model):
        given = [flag for flag, used in (("--passes", passes != "none"), ("--explain", explain),
                                          ("--dump-ir", dump_ir is not None)) if used]
        if given:
            raise click.UsageError(f"{', '.join(given)} applies to an ONNX model; {model} is a compiled artifact "
                                   "(its passes ran when it was compiled: use them with `polyport compile`)")
        from .runtime.session import load, signature_types
        session = load(model, target or "cpu")
        specs = signature_types(session.signature["inputs"])
    else:
        if target is not None:
            raise click.UsageError("--target applies to a compiled artifact (a directory); "
                                   "compile one with `polyport compile MODEL --target T -o ART`")
        from .runtime.reference import ReferenceSession
        graph = _import(model, dump_ir, passes, explain)
        session = ReferenceSession(graph)
        specs = [(v.name, v.type) for v in graph.inputs]
    if seq is not None:
        feeds = seq_inputs(specs, seq)
    elif not feeds and specs:
        names = ", ".join(name for name, _ in specs)
        raise errors.InputError(f"no inputs given: pass --input NAME=FILE.npy for each of {names}, or --seq N")
    start = time.perf_counter()
    results = session.run(feeds)
    elapsed = time.perf_counter() - start
    if getattr(session, "notice", None):      # e.g. ascend: "emulated on CPU (no Ascend device)"
        click.echo(session.notice, err=True)
    width = max((len(name) for name in results), default=0)
    for name, value in results.items():
        click.echo(f"{name:<{width}}  {summarise(value)}")
    if output is not None:
        save_npz(output, results)
        click.echo(f"wrote {output} ({len(results)} output{'s' * (len(results) != 1)}, {elapsed:.2f} s)")


def _positive(n: Optional[int]) -> Optional[int]:
    if n is not None and n < 1:
        raise click.BadParameter(f"{n} is not a positive integer")
    return n


def load_inputs(specs: Sequence[str]) -> dict[str, np.ndarray]:
    """Parse `NAME=FILE.npy` arguments and load the arrays (one-line errors naming the argument)."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{spec!r} is not NAME=FILE.npy", param_hint="'--input'")
        if name in feeds:
            raise click.BadParameter(f"input {name!r} is given twice", param_hint="'--input'")
        feeds[name] = load_npy(path, f"--input {spec}")
    return feeds


def load_npy(path: str, what: str) -> np.ndarray:
    """One array from a .npy file; `what` (the argument) starts every error message."""
    if not os.path.exists(path):
        raise errors.InputError(f"{what}: no such file")
    if os.path.isdir(path):
        raise errors.InputError(f"{what}: is a directory, expected a .npy file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"PK"):
            raise errors.InputError(f"{what}: is an .npz archive; --input takes one .npy array per input")
        if magic != b"\x93NUMPY":
            raise errors.InputError(f"{what}: not a .npy file (no NumPy header; write it with numpy.save)")
        return np.load(path, allow_pickle=False)
    except errors.PolyportError:
        raise
    except Exception as e:  # noqa: BLE001 - NumPy raises many types for a bad file; all mean the same here
        raise errors.InputError(f"{what}: not a readable .npy file ({type(e).__name__}: {e})") from None


def seq_inputs(specs, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`polyport run --seq N`'s inputs (see `runtime.inputs.generated_feeds`)."""
    from .runtime.inputs import generated_feeds
    return generated_feeds(specs, n, seed, what="--seq")


def summarise(value: Any) -> str:
    """`f32[1, 16, 1000]  min -3.1 max 2.9 mean 0.0012` for an array; a type name otherwise."""
    if not isinstance(value, np.ndarray):
        return f"{type(value).__name__} (not a tensor)"
    from .ir import dtypes
    try:
        dt = str(dtypes.from_numpy(value.dtype))
    except dtypes.UnknownDType:
        dt = str(value.dtype)
    text = f"{dt}[{', '.join(str(d) for d in value.shape)}]"
    if value.size == 0 or value.dtype.kind not in "biuf":
        return text
    x = value.astype(np.float64)
    return f"{text}  min {x.min():.6g}  max {x.max():.6g}  mean {x.mean():.6g}"


def save_npz(path: str, arrays: Mapping[str, Any]) -> None:
    """Like `np.savez`, for any array names (even `file`), written atomically."""
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise errors.PolyportError(f"cannot save output {name!r} to {path}: it is a "
                                       f"{type(value).__name__}, an .npz holds only tensors")
    with atomic_write(path) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)


# ---- compile -------------------------------------------------------------------------
@main.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", "targets", multiple=True, required=True, metavar="TARGET",
              help="cpu | cuda | rocm | ascend; repeat for several (added to an existing artifact).")
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False), metavar="ART",
              help="The artifact directory to write (replaced atomically; an artifact of the same model keeps "
                   "its other targets).")
@click.option("--replace", is_flag=True,
              help="Replace an existing artifact of another model at ART (its other targets are dropped).")
@click.option("--passes", default="default", show_default=True, metavar="PIPELINE",
              help="Pass pipeline to run before lowering.")
@click.option("--arch", "archs", multiple=True, metavar="ARCH",
              help="Device architectures for GPU targets (sm_80, sm_90, gfx90a, gfx942, ...).")
@click.option("--dump-ir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the IR as imported and after each pass into DIR.")
@click.option("--tokenizer", type=click.Path(dir_okay=False), metavar="tokenizer.json",
              help="Store this Hugging Face tokenizers file in the artifact (generate --prompt TEXT).")
@click.option("--quantize", type=click.Choice(["int8", "int4", "fp8"]), default=None,
              help="Store and compute linear weights as symmetric per-group codes (weight-only).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="Consecutive input features sharing one --quantize scale.")
@click.option("--quantize-lm-head", is_flag=True, help="With --quantize, quantize the LM head too.")
@click.option("--quantize-embeddings", is_flag=True,
              help="With --quantize (or --dtype bf16|f16), store the token-embedding table so too (per-group "
                   "codes along hidden); the gather dequantizes only the rows it reads.")
@click.option("--dtype", type=click.Choice(["f32", "bf16", "f16"]), default="f32", show_default=True,
              help="cuda, rocm: bf16/f16 weights, activations and KV caches, f32 accumulation; cpu: bf16/f16 "
                   "weights, f32 activations and accumulation; ascend: f16 (from f32 or f16) or bf16 compute, "
                   "f32 accumulation. cpu and cuda/rocm then need separate artifacts, ascend one of its own.")
@click.option("--no-generation", "no_generation", is_flag=True,
              help="Build only the cache-less program, not the KV-cache prefill / decode programs: compiles "
                   "about 3x faster on cpu; generate then recomputes the whole sequence each step.")
def compile_(model: str, targets: tuple[str, ...], out: str, replace: bool, passes: str, archs: tuple[str, ...],
             dump_ir: Optional[str], tokenizer: Optional[str], quantize: Optional[str], group_size: str,
             quantize_lm_head: bool, quantize_embeddings: bool, dtype: str, no_generation: bool) -> None:
    """Compile MODEL into a deployable artifact for one or more targets."""
    from .compiler import compile_model
    from .passes.quantize_weights import WeightQuantization
    from .targets.base import CompileOptions
    if quantize_lm_head and quantize is None:
        raise click.UsageError("--quantize-lm-head needs --quantize")
    if quantize_embeddings and quantize is None and dtype == "f32":
        raise click.UsageError("--quantize-embeddings needs --quantize or --dtype bf16|f16")
    quant = None
    if quantize:
        quant = WeightQuantization(quantize, int(group_size), quantize_lm_head, quantize_embeddings)
    elif quantize_embeddings:
        quant = WeightQuantization(dtype, lm_head=True, embeddings=True)
    on_stage = _stage_files(dump_ir) if dump_ir is not None else None
    start = time.perf_counter()
    path = compile_model(model, list(targets), out, pipeline=passes,
                         options=CompileOptions(dtype=dtype, archs=archs), quantization=quant, on_stage=on_stage,
                         tokenizer=tokenizer, progress=lambda msg: click.echo(f"polyport: {msg}", err=True),
                         replace=replace, generation=not no_generation)
    click.echo(f"wrote {path} ({', '.join(targets)}) in {time.perf_counter() - start:.1f} s")


def _stage_files(directory: str):
    """An `on_stage` callback writing each stage's IR to DIR/NN-<stage>.ir."""
    from .ir.printer import format_graph
    os.makedirs(directory, exist_ok=True)
    counter = iter(range(1000))

    def write(stage, graph):
        name = f"{next(counter):02d}-{stage.replace(' ', '-')}.ir"
        with atomic_write(os.path.join(directory, name)) as f:
            f.write((format_graph(graph) + "\n").encode())
    return write


# ---- generate (runtime/generation.py) -------------------------------------------------
@main.command()
@click.argument("artifact", type=click.Path())   # an artifact directory, or an ONNX file (reference executor)
@click.option("--target", "-t", default=None, metavar="TARGET",
              help="With an artifact directory: the target to run (default cpu).")
@click.option("--input-ids", "input_ids", type=click.Path(dir_okay=False), metavar="FILE.npy",
              help="Prompt token ids, int [seq] or [batch, seq].")
@click.option("--prompt-ids", metavar="5,17,42", help="Prompt token ids, comma-separated.")
@click.option("--prompt", metavar="TEXT", help="Prompt text (the artifact must hold a tokenizer: compile --tokenizer).")
@click.option("--lengths", metavar="3,9,17", help="With a [batch, seq] --input-ids: each prompt's length "
              "(right-padded rows).")
@click.option("--max-new-tokens", type=int, required=True, metavar="N")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no top-k cut.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens": [[...]], "ttft_ms": .., "tpot_ms": ..}.')
def generate(artifact: str, target: Optional[str], input_ids: Optional[str], prompt_ids: Optional[str],
             prompt: Optional[str], lengths: Optional[str], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             seed: Optional[int], as_json: bool) -> None:
    """Generate tokens from a prompt with the KV cache, streaming them; then time to first token and decode speed."""
    from .runtime.generation import GenerationError, generator_for
    if sum(x is not None for x in (input_ids, prompt_ids, prompt)) != 1:
        raise click.UsageError("give exactly one of --input-ids FILE.npy, --prompt-ids 5,17,42, --prompt TEXT")
    if max_new_tokens < 0:
        raise GenerationError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    lens = _int_list(lengths, "--lengths") if lengths is not None else None
    tokenizer = None
    if os.path.isdir(artifact):
        from .runtime.artifact import Artifact
        from .runtime.session import load
        art = Artifact(artifact)
        tokenizer = _tokenizer(art) if prompt is not None or not as_json else None
        session = generator_for(load(artifact, target or "cpu"), art.manifest.get("generation"))
        if getattr(session, "notice", None):      # e.g. ascend: "emulated on CPU (no Ascend device)"
            click.echo(session.notice, err=True)
    else:
        if target is not None:
            raise click.UsageError("--target applies to a compiled artifact (a directory); "
                                   "compile one with `polyport compile MODEL --target T -o ART`")
        if not os.path.isfile(artifact):
            raise errors.InputError(f"{artifact}: no such artifact directory or ONNX file")
        from .compiler import reference_generator
        session = reference_generator(artifact)
    if prompt is not None:
        if tokenizer is None:
            raise GenerationError("--prompt needs a tokenizer in the artifact; compile with --tokenizer "
                                  "tokenizer.json, or give --prompt-ids")
        ids = np.array([tokenizer.encode(prompt).ids], np.int64)
    elif prompt_ids is not None:
        ids = np.array([_int_list(prompt_ids, "--prompt-ids")], np.int64).reshape(1, -1)
    else:
        ids = load_npy(input_ids, f"--input-ids {input_ids}")
    times: list[float] = []
    stream = not as_json and ids.ndim <= 2 and len(np.atleast_2d(ids)) == 1
    shown: list[int] = []

    def on_token(tokens: np.ndarray) -> None:
        times.append(time.perf_counter())
        if stream:
            if tokenizer is None:
                click.echo(f"{tokens[0]} ", nl=False)
                return
            before = tokenizer.decode(shown)          # decode the whole text: pieces join differently alone
            shown.append(int(tokens[0]))
            click.echo(tokenizer.decode(shown)[len(before):], nl=False)

    start = time.perf_counter()
    out = session.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           on_token=on_token, lengths=lens)
    ttft = (times[0] - start) * 1e3 if times else None
    tpot = (times[-1] - times[0]) * 1e3 / (len(times) - 1) if len(times) > 1 else None
    if as_json:
        click.echo(json.dumps({"tokens": out.tolist(), "ttft_ms": ttft, "tpot_ms": tpot}))
        return
    if stream:
        click.echo()
    else:
        for row in out:
            click.echo(" ".join(str(t) for t in row) if tokenizer is None else tokenizer.decode(row.tolist()))
    if ttft is not None:
        speed = f", decode {1e3 / tpot:.1f} tokens/s ({tpot:.2f} ms/token)" if tpot else ""
        click.echo(f"time to first token {ttft:.1f} ms{speed}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")] if text.strip() else []
    except ValueError:
        raise errors.InputError(f"{option} {text!r} is not a comma-separated list of integers") from None


def _tokenizer(art):
    """The artifact's tokenizer (compile --tokenizer), or None."""
    rel = art.manifest.get("tokenizer")
    if rel is None:
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(art.path / rel))


# ---- bench and report (runtime/bench.py) ---------------------------------------------
@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--target", "-t", "targets", multiple=True, metavar="TARGET",
              help="cpu | cuda | rocm | ascend; repeat for several. Default: every target in the artifact, "
                   "plus estimated rows for cuda, rocm and ascend.")
@click.option("--seq", "seqs", multiple=True, type=click.IntRange(min=1), metavar="N",
              help="Sequence length (every symbolic dim); repeat for several. Default: 1, 16, 128.")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=1), help="Timed runs per row.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--device", default=None, metavar="NAME",
              help="Estimate for this device only: h100 | h200 | mi300x | 910b3 | cpu.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the rows as JSON (read by `polyport report`).")
@click.option("--decode", is_flag=True, help="Generation rows: time to first token and time per output token.")
@click.option("--context", "contexts", multiple=True, type=click.IntRange(min=1), metavar="N",
              help="With --decode: the context length (prompt, then tokens cached); repeat. Default: 128, 1024.")
def bench(artifact: str, targets: tuple[str, ...], seqs: tuple[int, ...], runs: int, warmup: int,
          device: Optional[str], json_path: Optional[str], decode: bool, contexts: tuple[int, ...]) -> None:
    """Latency of ARTIFACT per target and length: measured where the device is here, else estimated.

    Measured rows time session.run (warm-up, then --runs runs: median, p90, IQR).
    Rows for absent devices (cuda: H100/H200, rocm: MI300X, ascend: 910B3; the
    Ascend emulator is never timed) are roofline lower bounds, labelled estimated."""
    from .runtime import bench as benchmod
    if json_path is not None:
        check_writable(json_path)
    if contexts and not decode or decode and seqs:
        raise click.UsageError("--context goes with --decode (and --seq without it)")
    lengths = (list(contexts) or benchmod.DEFAULT_CONTEXTS) if decode else (list(seqs) or benchmod.DEFAULT_SEQS)
    doc = benchmod.bench(artifact, list(targets) or None, lengths, runs=runs, warmup=warmup, device=device,
                         progress=lambda msg: click.echo(f"polyport: {msg}", err=True), decode=decode)
    click.echo(benchmod.format_report([(os.path.basename(json_path or artifact.rstrip("/")), doc)]))
    if json_path is not None:
        benchmod.write_json(json_path, doc)
        click.echo(f"wrote {json_path} ({len(doc['rows'])} rows)")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Also draw a bar chart (needs matplotlib).")
@click.option("--fail-if-slower", "fail_pct", type=click.FloatRange(min=0), metavar="PCT",
              help="With --baseline: exit 1 if a row is more than PCT percent worse than there (default 25): "
                   "its ratio to ORT lower, or, for rows without one, its median slower.")
@click.option("--baseline", type=click.Path(dir_okay=False), metavar="FILE.json",
              help="The bench JSON to compare against (e.g. benchmarks/baseline.json).")
@click.pass_context
def report(ctx: click.Context, files: tuple[str, ...], plot_path: Optional[str], fail_pct: Optional[float],
           baseline: Optional[str]) -> None:
    """Tables (measured and estimated apart) from `polyport bench --json` FILES; optional plot and gate."""
    from .runtime import bench as benchmod
    if fail_pct is not None and baseline is None:
        raise click.UsageError("--fail-if-slower PCT needs --baseline FILE.json")
    if baseline is not None and fail_pct is None:
        fail_pct = benchmod.DEFAULT_FAIL_PCT
    if plot_path is not None:
        benchmod.require_matplotlib()
        check_writable(plot_path)
    docs = [(os.path.basename(f), benchmod.read_json(f)) for f in files]
    base_doc = benchmod.read_json(baseline) if baseline is not None else None
    click.echo(benchmod.format_report(docs))
    if plot_path is not None:
        benchmod.plot(docs, plot_path, base_doc)
        click.echo(f"wrote {plot_path}")
    if base_doc is not None:
        found, compared = benchmod.regressions(docs, base_doc, fail_pct)
        if not compared:
            click.echo(f"regression check: no measured row matches one in {baseline} (nothing compared)", err=True)
        for message in found:
            click.echo(f"regression: {message}", err=True)
        if found:
            ctx.exit(1)
        click.echo(f"regression check: {compared} measured row(s) within {fail_pct:g}% of {baseline}")


# ---- shared --------------------------------------------------------------------------
def _import(model: str, dump_ir: Optional[str], passes: str = "none", explain: bool = False):
    from .frontend.onnx_import import import_onnx
    from .passes.manager import stage_dumper
    from .passes.pipelines import run_pipeline
    if dump_ir is not None:
        check_writable(dump_ir)
    graph = import_onnx(model)
    stages: list[str] = []
    pm = run_pipeline(graph, passes, on_stage=stage_dumper(stages) if dump_ir is not None else None)
    if explain:
        click.echo(pm.summary(explain=True), err=True)
    if dump_ir is not None:
        with atomic_write(dump_ir) as f:
            f.write("\n".join(stages).encode())
    return graph


if __name__ == "__main__":
    main()

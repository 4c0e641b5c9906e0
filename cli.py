"""The `polyport` command line.

    polyport inspect MODEL [--json] [--dump-ir FILE]
    polyport run MODEL (--input NAME=FILE.npy ... | --seq N) [--output OUT.npz] [--dump-ir FILE]
    polyport bench ART [--target T ...] [--seq N ...] [--runs N] [--warmup N] [--device NAME] [--json FILE]
    polyport report FILE.json ... [--plot FILE.png] [--baseline FILE.json [--fail-if-slower PCT]]

Every failure the user can cause (a bad model file, an unsupported op, a wrong
input, a bad argument) is printed as one line, `polyport: error: <message>`, on
stderr with exit status 2. Anything else is a bug in polyport and keeps its
traceback; `--debug` (or POLYPORT_DEBUG=1) shows the traceback for user errors
too. Files are written atomically: a failed command leaves no half-written file.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import zipfile
from typing import Any, Iterator, Mapping, Optional, Sequence

import click
import numpy as np

from . import __version__, errors

EXIT_USER_ERROR = 2


class _Group(click.Group):
    """A click group whose errors are one line on stderr (see the module docstring)."""

    debug = False  # set by the --debug option before any command runs

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        _Group.debug = False
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name or "polyport", complete_var, standalone_mode=False, **extra)
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
            click.echo("polyport: interrupted", err=True)
            sys.exit(130)
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

    Today: import (symbolic shapes, folded shape arithmetic), inspection and the
    NumPy reference executor."""
    _Group.debug = debug


PASSES_OPTION = click.option("--passes", default="none", show_default=True, metavar="PIPELINE",
                             help="Pass pipeline to run after import: none | canonicalize | default.")
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
    if as_json:
        click.echo(json.dumps(stats, indent=2))
    else:
        click.echo(format_stats(stats, model))


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
        _check_writable(output)
    if os.path.isdir(model):
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
              help="The artifact directory to write (replaced atomically).")
@click.option("--passes", default="default", show_default=True, metavar="PIPELINE",
              help="Pass pipeline to run before lowering.")
@click.option("--arch", "archs", multiple=True, metavar="ARCH",
              help="Device architectures for GPU targets (sm_80, sm_90, gfx90a, gfx942, ...).")
@click.option("--dump-ir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the IR as imported and after each pass into DIR.")
def compile_(model: str, targets: tuple[str, ...], out: str, passes: str, archs: tuple[str, ...],
             dump_ir: Optional[str]) -> None:
    """Compile MODEL into a deployable artifact for one or more targets."""
    from .compiler import compile_model
    from .targets.base import CompileOptions
    on_stage = _stage_files(dump_ir) if dump_ir is not None else None
    start = time.perf_counter()
    path = compile_model(model, list(targets), out, pipeline=passes, options=CompileOptions(archs=archs),
                         on_stage=on_stage, progress=lambda msg: click.echo(f"polyport: {msg}", err=True))
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
def bench(artifact: str, targets: tuple[str, ...], seqs: tuple[int, ...], runs: int, warmup: int,
          device: Optional[str], json_path: Optional[str]) -> None:
    """Latency of ARTIFACT per target and length: measured where the device is here, else estimated.

    Measured rows time session.run (warm-up, then --runs runs: median, p90, IQR).
    Rows for absent devices (cuda: H100/H200, rocm: MI300X, ascend: 910B3; the
    Ascend emulator is never timed) are roofline lower bounds, labelled estimated."""
    from .runtime import bench as benchmod
    if json_path is not None:
        _check_writable(json_path)
    doc = benchmod.bench(artifact, list(targets) or None, list(seqs) or benchmod.DEFAULT_SEQS, runs=runs,
                         warmup=warmup, device=device, progress=lambda msg: click.echo(f"polyport: {msg}", err=True))
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
        _check_writable(plot_path)
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
        _check_writable(dump_ir)
    graph = import_onnx(model)
    stages: list[str] = []
    pm = run_pipeline(graph, passes, on_stage=stage_dumper(stages) if dump_ir is not None else None)
    if explain:
        click.echo(pm.summary(explain=True), err=True)
    if dump_ir is not None:
        with atomic_write(dump_ir) as f:
            f.write("\n".join(stages).encode())
    return graph


def _check_writable(path: str) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise errors.PolyportError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(directory):
        raise errors.PolyportError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise errors.PolyportError(f"cannot write {path}: directory {directory} is not writable")


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[Any]:
    """A binary file object whose content replaces `path` only if the block succeeds."""
    _check_writable(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise errors.PolyportError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise errors.PolyportError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    main()

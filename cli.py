"""The `polyport` command line.

    polyport inspect MODEL [--json] [--dump-ir FILE]
    polyport run MODEL (--input NAME=FILE.npy ... | --seq N) [--output OUT.npz] [--dump-ir FILE]

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


# ---- inspect -------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--dump-ir", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the imported IR (text form) to FILE.")
def inspect(model: str, as_json: bool, dump_ir: Optional[str]) -> None:
    """Show a model's signature, ops and parameters.

    Inputs and outputs with their symbolic dims, the op histogram over all nodes
    (subgraphs included), the weight count and the opsets."""
    from .ir.stats import graph_stats
    graph = _import(model, dump_ir)
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
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=FILE.npy",
              help="A model input from a .npy file; repeat for each input.")
@click.option("--seq", type=int, callback=lambda ctx, param, n: _positive(n), metavar="N",
              help="Instead of --input: deterministic inputs (seed 0) with every symbolic dim set to N "
                   "(integers in [0, 100) for integer inputs, e.g. token ids; standard normal for floats).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), metavar="OUT.npz",
              help="Save the outputs, under their graph names, to an .npz archive.")
@click.option("--dump-ir", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the imported IR (text form) to FILE.")
def run(model: str, inputs: tuple[str, ...], seq: Optional[int], output: Optional[str],
        dump_ir: Optional[str]) -> None:
    """Run a model on the reference executor.

    Prints each output's type and min / max / mean; --output saves them."""
    from .runtime.reference import ReferenceSession
    if inputs and seq is not None:
        raise click.UsageError("give either --input NAME=FILE.npy ... or --seq N, not both")
    feeds = load_inputs(inputs)            # argument errors first, before a long import
    if output is not None:
        _check_writable(output)
    graph = _import(model, dump_ir)
    if seq is not None:
        feeds = seq_inputs(graph, seq)
    elif not feeds and graph.inputs:
        names = ", ".join(v.name for v in graph.inputs)
        raise errors.InputError(f"no inputs given: pass --input NAME=FILE.npy for each of {names}, or --seq N")
    session = ReferenceSession(graph)
    start = time.perf_counter()
    results = session.run(feeds)
    elapsed = time.perf_counter() - start
    width = max((len(name) for name in results), default=0)
    for name, value in results.items():
        click.echo(f"{name:<{width}}  {summarise(value)}")
    if output is not None:
        save_npz(output, results)
        click.echo(f"wrote {output} ({len(results)} output{'s' * (len(results) != 1)}, "
                   f"reference executor {elapsed:.2f} s)")


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


def seq_inputs(graph, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for `graph` with every symbolic dim bound to `n`.

    Integer inputs get integers in [0, 100) (token ids), float inputs standard
    normal values, bool inputs random booleans; drawn in input order from one
    `np.random.default_rng(seed)`."""
    from .ir.types import TensorType
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph.inputs:
        t = v.type
        if not isinstance(t, TensorType) or t.shape is None or t.dtype is None:
            raise errors.InputError(f"--seq: input {v.name!r} has type {t}; give it with --input NAME=FILE.npy")
        shape = []
        for d in t.shape:
            if d is None:
                raise errors.InputError(f"--seq: input {v.name!r} has an unknown dim ({t}); "
                                        f"give it with --input NAME=FILE.npy")
            shape.append(d if isinstance(d, int) else d.evaluate({s: n for s in d.symbols}))
        if any(s < 0 for s in shape):
            raise errors.InputError(f"--seq {n}: input {v.name!r} would have the negative shape {shape} ({t})")
        dt = t.dtype
        if dt.is_integer:
            x = rng.integers(0, 100, size=shape, dtype=np.int64).astype(dt.numpy)
        elif dt.is_float and dt.numpy is not None:
            x = rng.standard_normal(size=shape, dtype=np.float32).astype(dt.numpy)
        elif dt.name == "bool":
            x = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise errors.InputError(f"--seq: cannot generate {dt} input {v.name!r}; give it with --input")
        feeds[v.name] = x
    return feeds


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


# ---- shared --------------------------------------------------------------------------
def _import(model: str, dump_ir: Optional[str]):
    from .frontend.onnx_import import import_onnx
    if dump_ir is not None:
        _check_writable(dump_ir)
    graph = import_onnx(model)
    if dump_ir is not None:
        from .ir.printer import format_graph
        with atomic_write(dump_ir) as f:
            f.write((format_graph(graph) + "\n").encode())
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

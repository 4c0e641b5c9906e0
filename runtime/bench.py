"""`polyport bench` and `polyport report`: latency per target and length, measured or estimated.

A row is `measured` only when the target's device is on this machine and the
artifact was built for it: session.run is timed (warm-up, then `runs` timed
runs; median, p90, IQR). For cuda/rocm "on this machine" means TVM's runtime
can drive the GPU (runtime/gpu_session.py); session.run returns host arrays,
so each timed run includes the device's work to the end (inputs up, outputs
down, synchronised). Every other row is `estimated`: the roofline lower
bound (runtime/roofline.py) for a named device (H100/H200 for cuda, MI300X for
rocm, 910B3 for ascend). The Ascend target runs here only as a CPU emulator,
which is never timed as if it were Ascend: ascend rows are always estimated.
The two kinds are never mixed in one table, and regression checks compare
measured rows only.

JSON written by `bench` (and read by `report`):

    {"schema": 1, "model": NAME, "artifact": PATH, "machine": {...}, "spread": "iqr",
     "rows": [{"target", "device", "seq", "kind": "measured"|"estimated",
               "median_ms", "p90_ms", "spread_ms", "runs", ...}]}

Estimated rows have p90_ms = spread_ms = null and runs = 0, plus `bound`
("compute" | "memory"), `flops` and `bytes`. A row may name its own `model`
(one document for several models: benchmarks/compare.py --bench-json). A
measured row compared with ONNX Runtime (benchmarks/compare.py: each engine
alone in its own process) also has `ort_ms` and `ratio_vs_ort` (ORT time /
polyport time, the median of per-round ratios) with `ratio_min`/`ratio_max`,
and `ratio_best`: each engine's fastest round, ORT's over polyport's.
`report --baseline` gates such rows on a ratio, which holds across machines
where absolute times do not (across like CPUs: the baseline's row for the same
device first): on `ratio_best` where both rows have it, else on `ratio_vs_ort`.

`bench --decode` (generation, runtime/generation.py) writes rows with a
`phase`: "ttft" (time to first token: the prefill of `seq` = context tokens)
and "tpot" (time per output token: one decode step with `seq` tokens cached).
Measured: `start` timed for ttft, then one `append` per timed run. Estimated
tpot: the weights one token reads (the cost at seq 1: MoE counts its active
experts only) plus the whole cache (bytes per token x context, at most each
layer's window), flops at seq 1; estimated ttft: the cache-less forward at
seq = context (its LM head over every row: a slight over-count).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from .. import __version__, errors, files
from ..devices import DEVICES, TARGET_DEVICES, TARGETS
from .inputs import generated_feeds
from . import roofline
from .artifact import Artifact

SCHEMA = 1
DEFAULT_SEQS = (1, 16, 128)
DEFAULT_CONTEXTS = (128, 1024)
ESTIMATED_TARGETS = ("cuda", "rocm", "ascend")
DEFAULT_FAIL_PCT = 25.0            # `report --baseline` without --fail-if-slower
ROW_KEYS = ("target", "device", "seq", "kind", "median_ms", "p90_ms", "spread_ms", "runs")

Loader = Callable[[str, str], Any]


# ---- where things run --------------------------------------------------------------------
GPU_DEVICE_NODES = {"cuda": ("/dev/nvidiactl", "/dev/nvidia0"), "rocm": ("/dev/kfd",)}


def device_problem(target: str) -> Optional[str]:
    """Why `target` cannot be measured on this machine, or None when it can.

    ascend: never (its runtime here is a CPU emulator). cuda/rocm: the device
    nodes first (cheap), then whether TVM's runtime can drive the device."""
    if target == "cpu":
        return None
    if target in GPU_DEVICE_NODES:
        if not any(os.path.exists(p) for p in GPU_DEVICE_NODES[target]):
            return f"no {target} device on this machine"
        from .gpu_session import device_problem as gpu_problem
        return gpu_problem(target)
    return f"no {target} device on this machine"


def device_present(target: str) -> bool:
    """Whether `target`'s device is on this machine and usable by polyport's runtime."""
    return device_problem(target) is None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "polyport": __version__}


def resolve_device(name: str) -> str:
    key = name.lower().replace(" ", "").replace("-", "")
    aliases = {"h100sxm": "h100", "h200sxm": "h200", "mi300": "mi300x", "ascend910b3": "910b3"}
    key = aliases.get(key, key)
    if key not in DEVICES:
        raise errors.PolyportError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    return key


# ---- inputs and timing -------------------------------------------------------------------
def make_feeds(specs: Sequence[tuple[str, Any]], seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs with every symbolic dim bound to `seq` (as `polyport run --seq`)."""
    return generated_feeds(specs, seq, seed, what="bench")


def summarize(times_s: Sequence[float]) -> dict[str, Any]:
    """median, p90 and IQR (p75 - p25) in ms, plus min and max."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p25, p50, p75, p90 = np.percentile(ms, [25, 50, 75, 90])
    return {"median_ms": float(p50), "p90_ms": float(p90), "spread_ms": float(p75 - p25),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "runs": int(ms.size)}


def time_runs(run: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


# ---- bench -------------------------------------------------------------------------------
def plan(built: Sequence[str], targets: Optional[Sequence[str]], device: Optional[str]) -> list[tuple[str, str, str]]:
    """(target, kind, device key or "") for each row group, in order."""
    if device is not None:
        device = resolve_device(device)
        dev_target = next(t for t, names in TARGET_DEVICES.items() if device in names)
    wanted = list(dict.fromkeys(targets)) if targets else list(dict.fromkeys(list(built) + list(ESTIMATED_TARGETS)))
    if device is not None and dev_target not in wanted:
        wanted.append(dev_target)
    unknown = [t for t in wanted if t not in TARGET_DEVICES]
    if unknown:
        raise errors.PolyportError(f"unknown target {unknown[0]!r}; known: {', '.join(TARGETS)}")
    out = []
    for t in wanted:
        measured = t in built and device_present(t)
        if measured:
            out.append((t, "measured", ""))
        if device is not None:
            if t == dev_target:
                out.append((t, "estimated", device))     # --device cpu: the roofline beside the measurement
        elif not measured:
            out.extend((t, "estimated", d) for d in TARGET_DEVICES[t])
    return out


def bench(artifact: str | os.PathLike, targets: Optional[Sequence[str]] = None,
          seqs: Sequence[int] = DEFAULT_SEQS, runs: int = 20, warmup: int = 3, device: Optional[str] = None,
          loader: Optional[Loader] = None, progress: Callable[[str], None] = lambda msg: None,
          decode: bool = False) -> dict[str, Any]:
    """Benchmark an artifact; returns the JSON document (see the module docstring).
    With `decode`, `seqs` are contexts and the rows are time to first token and time per output token."""
    if runs < 1 or warmup < 0:
        raise errors.PolyportError(f"bench: --runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})")
    if not seqs or any(s < 1 for s in seqs):
        raise errors.PolyportError(f"bench: every --seq must be a positive integer (got {list(seqs)})")
    art = Artifact(artifact)
    cost = art.manifest.get("cost")
    symbols = list(art.signature.get("symbols", []))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for t in (targets or ()):
        if device_present(t) and t not in art.targets:
            notes.append(f"{t}: its device is here but the artifact has no {t} target (built: "
                         f"{', '.join(art.targets) or 'none'}): estimated only; compile with --target {t} to measure")
    for t in art.targets:                 # a GPU is plugged in but cannot be used: say why it is only estimated
        if t in GPU_DEVICE_NODES and any(os.path.exists(p) for p in GPU_DEVICE_NODES[t]):
            problem = device_problem(t)
            if problem:
                notes.append(f"{t}: estimated only: {problem}")
    for target, kind, dev in plan(art.targets, targets, device):
        if kind == "measured":
            measure = _measure_decode if decode else _measure
            rows.extend(measure(art, target, seqs, runs, warmup, loader, progress))
            continue
        spec = DEVICES[dev]
        if not cost or "flops" not in cost:
            why = cost.get("error") if cost else "the manifest has no cost (compiled by an older polyport)"
            note = f"no estimate for {target} ({spec.name}): {why}"
            if note not in notes:
                notes.append(note)
                progress(note)
            continue
        for seq in seqs:
            for phase, est in _estimates(cost, spec, seq, symbols, art.manifest.get("generation") if decode else None):
                rows.append({"target": target, "device": spec.name, "seq": int(seq), "kind": "estimated",
                             "median_ms": est.latency_s * 1e3, "p90_ms": None, "spread_ms": None, "runs": 0,
                             "bound": est.bound, "flops": est.flops, "bytes": est.bytes, **phase})
    doc = {"schema": SCHEMA, "model": art.signature.get("name", Path(artifact).name), "artifact": str(artifact),
           "machine": machine_info(), "spread": "iqr", "runs": runs, "warmup": warmup, "rows": rows}
    if notes:
        doc["notes"] = notes
    return doc


def _measure(art: Artifact, target: str, seqs: Sequence[int], runs: int, warmup: int,
             loader: Optional[Loader], progress) -> list[dict[str, Any]]:
    from .session import signature_types
    if loader is None:
        from .session import load as loader
    if target == "cpu":
        os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))   # TVM defaults to half the cores
    progress(f"loading {target}")
    session = loader(str(art.path), target)
    sig = getattr(session, "signature", None) or art.signature
    specs = signature_types(sig["inputs"])
    # GPU sessions name their device (e.g. "NVIDIA H200"); the cpu row names the host CPU's DeviceSpec.
    device = getattr(session, "device_name", None) or DEVICES[TARGET_DEVICES[target][0]].name
    rows = []
    for seq in seqs:
        feeds = make_feeds(specs, seq)
        progress(f"timing {target} at seq {seq}: {warmup} warm-up + {runs} runs")
        stats = summarize(time_runs(lambda: session.run(feeds), runs, warmup))
        row = {"target": target, "device": device, "seq": int(seq), "kind": "measured", **stats}
        if getattr(session, "arch", None):
            row["arch"] = session.arch        # the library that ran (cuda: sm_XY, rocm: gfxNNN)
        rows.append(row)
    return rows


def tpot_bytes(cost: Mapping[str, Any], generation: Mapping[str, Any], context: int, symbols=None,
               batch: int = 1) -> int:
    """Bytes one decode step reads at `context` cached tokens: the weights `batch` tokens read (the cost at
    seq `batch`: MoE counts at most batch x top_k experts) plus each sequence's whole cache (at most each
    layer's window)."""
    cache = sum(int(layer["bytes_per_token"]) * min(context, layer.get("capacity") or context)
                for layer in generation.get("layers", ()))
    return roofline.total_bytes(cost, roofline.bind(cost, batch, symbols)) + batch * cache


def _estimates(cost, spec, seq: int, symbols, generation: Optional[Mapping[str, Any]]):
    """[(extra row keys, Estimate)]: one plain row, or the ttft and tpot rows of generation."""
    if generation is None:
        return [({}, roofline.estimate(cost, spec, roofline.bind(cost, seq, symbols)))]
    ttft = roofline.estimate(cost, spec, roofline.bind(cost, seq, symbols))
    step = roofline.estimate(cost, spec, roofline.bind(cost, 1, symbols))
    nbytes = tpot_bytes(cost, generation, seq, symbols)
    tpot = roofline.Estimate(spec.name, step.flops, nbytes, step.compute_s, nbytes / spec.memory_bandwidth)
    return [({"phase": "ttft"}, ttft), ({"phase": "tpot"}, tpot)]


def _measure_decode(art: Artifact, target: str, contexts: Sequence[int], runs: int, warmup: int,
                    loader: Optional[Loader], progress) -> list[dict[str, Any]]:
    from .generation import generator_for
    if loader is None:
        from .session import load as loader
    progress(f"loading {target}")
    session = generator_for(loader(str(art.path), target), art.manifest.get("generation"))
    device = getattr(session, "device_name", None) or DEVICES[TARGET_DEVICES[target][0]].name
    vocab = int((art.manifest.get("generation") or {}).get("vocab") or 2)
    rows = []
    for context in contexts:
        ids = np.random.default_rng(context).integers(0, vocab, size=(1, context), dtype=np.int64)
        progress(f"timing {target} generation at context {context}: {warmup} warm-up + {runs} runs")
        budget = context + warmup + runs + 1
        states = []
        ttft = time_runs(lambda: states.append(session.start(ids, max_length=budget)), runs, warmup)
        state = states[-1]
        token = np.zeros(1, np.int64)
        tpot = time_runs(lambda: state.append(token), runs, warmup)
        for phase, times in (("ttft", ttft), ("tpot", tpot)):
            rows.append({"target": target, "device": device, "seq": int(context), "kind": "measured",
                         "phase": phase, **summarize(times)})
    return rows


# ---- JSON --------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """Write `doc` atomically: the file is replaced only once the new one is complete."""
    with files.atomic_write(path) as f:
        f.write((json.dumps(doc, indent=2) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise errors.PolyportError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.PolyportError(f"{path}: not a readable bench JSON file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise errors.PolyportError(f"{path}: not a polyport bench file (no 'rows' list)")
    for i, row in enumerate(doc["rows"]):
        missing = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else list(ROW_KEYS)
        if missing:
            raise errors.PolyportError(f"{path}: row {i} lacks {', '.join(missing)}")
        if row["kind"] not in ("measured", "estimated"):
            raise errors.PolyportError(f"{path}: row {i} has kind {row['kind']!r} (measured | estimated)")
    return doc


# ---- report ------------------------------------------------------------------------------
def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x >= 1 else f"{x:.3g}"


def _seq(r: Mapping[str, Any]) -> str:
    """The seq cell: `128`, or `128 ttft` / `128 tpot` for generation rows (seq = the context)."""
    return f"{r['seq']} {r['phase']}" if r.get("phase") else str(r["seq"])


def _sort_key(r: Mapping[str, Any]):
    order = {t: i for i, t in enumerate(TARGET_DEVICES)}
    return (r["_model"], order.get(r["target"], 99), r["target"], r["seq"], r["device"], r["_file"])


def text_table(header: list[str], body: list[list[str]], right: Iterable[int]) -> list[str]:
    right = set(right)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)     # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]


def _vs_ort(r: Mapping[str, Any]) -> list[str]:
    if "ratio_vs_ort" not in r:
        return ["-", "-"]
    return [_ms(r["ort_ms"]), f"{r['ratio_vs_ort']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"]


def labelled_rows(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    return sorted((_labelled(label, doc, r) for label, doc in docs for r in doc["rows"]), key=_sort_key)


def _labelled(label: str, doc: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """The row with its file's label and its model (the row's own, else the document's)."""
    return {**row, "_file": label, "_model": str(row.get("model", doc.get("model", "?")))}


def format_report(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Tables for (label, bench document) pairs: measured rows, then estimated rows, never mixed."""
    rows = labelled_rows(docs)
    several = len(docs) > 1
    lines: list[str] = []
    measured = [r for r in rows if r["kind"] == "measured"]
    estimated = [r for r in rows if r["kind"] == "estimated"]
    machines = sorted({f"{d.get('machine', {}).get('cpu', '?')} x{d.get('machine', {}).get('cpus', '?')}"
                       for _, d in docs})
    spreads = sorted({str(d.get("spread", "iqr")).replace("iqr", "IQR") for _, d in docs})
    lines.append(f"measured (wall-clock median of session.run on {', '.join(machines)}; spread = {', '.join(spreads)})")
    if measured:
        vs_ort = any("ratio_vs_ort" in r for r in measured)
        header = ["model", "target", "device", "seq", "median ms", "p90 ms", "spread ms", "runs"] \
            + (["ORT ms", "ORT/polyport"] if vs_ort else [])
        body = [[r["_model"], r["target"], r["device"], _seq(r), _ms(r["median_ms"]), _ms(r["p90_ms"]),
                 _ms(r["spread_ms"]), str(r["runs"])] + (_vs_ort(r) if vs_ort else [])
                + ([r["_file"]] if several else []) for r in measured]
        lines += text_table(header + (["file"] if several else []), body, right=range(3, 10))
    else:
        lines.append("  (none)")
    lines.append("")
    lines.append("estimated (roofline LOWER BOUND max(FLOPs / peak, bytes / bandwidth) from the device's "
                 "spec sheet: a bound, not a measurement)")
    if estimated:
        header = ["model", "target", "device", "seq", "bound ms", "bound by", "GFLOP", "MB moved"]
        body = [[r["_model"], r["target"], r["device"], _seq(r), _ms(r["median_ms"]), r.get("bound", "-"),
                 f"{r['flops'] / 1e9:.4g}" if r.get("flops") is not None else "-",
                 f"{r['bytes'] / 1e6:.4g}" if r.get("bytes") is not None else "-"]
                + ([r["_file"]] if several else []) for r in estimated]
        lines += text_table(header + (["file"] if several else []), body, right=(3, 4, 6, 7))
    else:
        lines.append("  (none)")
    for label, doc in docs:
        for note in doc.get("notes", ()):
            lines.append(f"note ({label}): {note}")
    return "\n".join(lines)


def regressions(docs: Sequence[tuple[str, Mapping[str, Any]]], baseline: Mapping[str, Any],
                pct: float) -> tuple[list[str], int]:
    """Measured rows worse than the baseline's matching row by more than `pct` percent.

    Rows match on (model, target, device, seq, phase). Rows compared with ORT fail when their ratio
    (ORT / polyport) falls below baseline x (1 - pct/100): the ratio of the engines' fastest rounds where
    both rows have it (`ratio_best`), else the median of the rounds' ratios. Interference only ever adds
    time, so the fastest round is the steadier figure: on a shared 2-vCPU EPYC ORT's round medians for
    one shape moved by half, which let a 1.6x slower attention kernel pass the median ratio's gate, while
    the fastest rounds' ratio of llama_a at 128 tokens read 1.16-1.23x over four runs and 0.70x with that
    kernel. They match the baseline's row for the same
    device where it has one, else its row for any device: both engines' kernels differ per instruction
    set (llama_a at 128 tokens: 1.36x on an AVX-512 Xeon, 1.10x on an AVX2 EPYC), so a ratio is only
    comparable on like CPUs. Other rows fail when their median is more than pct% slower.
    Returns (messages, rows compared)."""
    base = {(r["_model"], r["target"], r["device"], r["seq"], r.get("phase")): r
            for r in labelled_rows([("baseline", baseline)]) if r["kind"] == "measured"}
    ratio_of = ratio_baseline(baseline)
    found, compared = [], 0
    for r in labelled_rows(docs):
        if r["kind"] != "measured":
            continue
        b = ratio_of(r) if "ratio_vs_ort" in r else None
        if b is not None:
            compared += 1
            key = "ratio_best" if "ratio_best" in r and "ratio_best" in b else "ratio_vs_ort"
            floor = b[key] * (1.0 - pct / 100.0)
            if r[key] < floor:
                change = (1.0 - r[key] / b[key]) * 100.0
                what = "the fastest rounds" if key == "ratio_best" else "the median of rounds"
                found.append(f"{r['_model']} {r['target']} seq {r['seq']}: ORT/polyport {r[key]:.2f}x vs baseline "
                             f"{b[key]:.2f}x, {what} (-{change:.1f}% > {pct:g}%) [{r['_file']}]")
            continue
        b = base.get((r["_model"], r["target"], r["device"], r["seq"], r.get("phase")))
        if b is None or not b["median_ms"]:
            continue
        compared += 1
        change = (r["median_ms"] / b["median_ms"] - 1.0) * 100.0
        if change > pct:
            found.append(f"{r['_model']} {r['target']} seq {r['seq']}: median {_ms(r['median_ms'])} ms vs "
                         f"baseline {_ms(b['median_ms'])} ms (+{change:.1f}% > {pct:g}%) [{r['_file']}]")
    return found, compared


def ratio_baseline(baseline: Mapping[str, Any]):
    """row -> the baseline's row with a ratio to ORT for it, or None: the one on the same device where
    there is one, else the first in the file for any device (same model, target, seq and phase)."""
    same, anywhere = {}, {}
    for r in (_labelled("baseline", baseline, r) for r in baseline["rows"]):       # in file order
        if r["kind"] == "measured" and "ratio_vs_ort" in r:
            key = (r["_model"], r["target"], r["seq"], r.get("phase"))
            same[key + (r["device"],)] = r
            anywhere.setdefault(key, r)

    def find(row):
        key = (row["_model"], row["target"], row["seq"], row.get("phase"))
        return same.get(key + (row["device"],)) or anywhere.get(key)
    return find


def plot(docs: Sequence[tuple[str, Mapping[str, Any]]], path: str,
         baseline: Optional[Mapping[str, Any]] = None) -> None:
    """Bar charts of medians, measured and estimated in separate panels (log scale), and of the
    ratios to ORT where rows have them (with the baseline's ratios marked)."""
    plt = require_matplotlib()
    rows = labelled_rows(docs)
    kinds = [k for k in ("measured", "estimated") if any(r["kind"] == k for r in rows)]
    if not kinds:
        raise errors.PolyportError("--plot: the bench files hold no rows")
    ratios = [r for r in rows if "ratio_vs_ort" in r]
    fig, axes = plt.subplots(len(kinds) + bool(ratios), 1, figsize=(10, 3.5 * (len(kinds) + bool(ratios))),
                             squeeze=False)
    if ratios:
        ax = axes[-1, 0]
        values = [r["ratio_vs_ort"] for r in ratios]
        errs = [[v - r["ratio_min"] for v, r in zip(values, ratios)], [r["ratio_max"] - v for v, r in zip(values, ratios)]]
        ax.bar(range(len(ratios)), values, yerr=errs, color="tab:green")
        if baseline is not None:
            ratio_of = ratio_baseline(baseline)
            marks = [(i, b["ratio_vs_ort"]) for i, r in enumerate(ratios) if (b := ratio_of(r)) is not None]
            if marks:
                ax.scatter([i for i, _ in marks], [v for _, v in marks], marker="_", s=400, color="black",
                           label="baseline", zorder=3)
                ax.legend(fontsize=7)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(ratios)))
        ax.set_xticklabels([f"{r['_model']}\nseq {r['seq']}" for r in ratios], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ORT ms / polyport ms")
        ax.set_title("cpu vs ONNX Runtime, engines alone (above 1: polyport faster; bar: min-max of rounds)")
    for ax, kind in zip(axes[:, 0], kinds):
        sel = [r for r in rows if r["kind"] == kind]
        labels = [f"{r['_model']}\n{r['target']}\n{r['device']}\nseq {r['seq']}" + (f"\n{r['_file']}" if len(docs) > 1 else "")
                  for r in sel]
        values = [r["median_ms"] for r in sel]
        errs = [r["spread_ms"] or 0.0 for r in sel]
        ax.bar(range(len(sel)), values, yerr=errs if kind == "measured" else None,
               color="tab:blue" if kind == "measured" else "tab:gray", hatch=None if kind == "measured" else "//")
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(labels, fontsize=6 if len(sel) > 8 else 7, rotation=90 if len(sel) > 8 else 0)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title("measured median (error bar: spread)" if kind == "measured"
                     else "estimated: roofline lower bound (not measured)")
    fig.tight_layout()
    try:
        with files.atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)


def require_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise errors.PolyportError("--plot needs matplotlib, which is not installed "
                                   "(pip install matplotlib); the table works without it") from None
    return plt

#!/usr/bin/env python
"""polyport's cpu target against ONNX Runtime (CPU EP), each engine alone in its own process.

    python benchmarks/compare.py --work-dir /tmp/bench                 # the README's table
    python benchmarks/compare.py --work-dir DIR [--models NAME ...] [--seq 1 16 128 512] [--batch 1 8]
        [--rounds 3] [--runs 10] [--warmup 3] [--min-ms 300] [--contexts 128 1024 4096] [--prompts 128 512]
        [--no-coexist] [--json FILE] [--bench-json FILE [--estimate-targets]]

Per model: ORT and polyport children alternate (engines.py), --rounds rounds,
each child timing at least --runs runs, and at least --min-ms of them, at
every (batch, seq) after --warmup; a STREAM
triad child runs in the same rounds (memory bandwidth of this machine now), and
an fma child (its multiply-add peak: each prefill row says what fraction of
it each engine reached, counting the artifact's cost-model FLOPs);
decode rows (time to first token at --prompts, time per output token at
--contexts) come from the cpu session's generation API, or a line saying it
is absent; the coexistence figure comes from coexist.py (its own child).
Artifacts are compiled into --work-dir (cached by the ONNX file, polyport's
sources and the targets). Prints a Markdown table: medians over rounds with
their min..max; ratio = ORT ms / polyport ms (above 1: polyport is faster),
taken per round, so its spread is the rounds' own.

--bench-json writes the measured rows as a `polyport bench` document
(`polyport report` reads it; its ratios are what `report --baseline` gates),
with --estimate-targets also the roofline rows for cuda, rocm and ascend.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engines  # noqa: E402

DEFAULT_MODELS = ("llama_a", "mixtral_a", "qwen3_moe_a", "deepseek_v3_a", "deepseek_v4_a")


def fmt_ms(s: dict) -> str:
    return f"{s['median']:.3g} ({s['min']:.3g}–{s['max']:.3g})"


def fmt_ratio(s: dict) -> str:
    return f"**{s['median']:.2f}x** ({s['min']:.2f}–{s['max']:.2f})"


def fmt_fraction(row: dict, engine: str) -> str:
    frac = row.get(f"{engine}_peak_fraction")
    return "–" if frac is None else f"{frac:.0%}"


def peak_fractions(rows: list[dict], peak: dict) -> None:
    """Each prefill row with `flops`: `{engine}_peak_fraction` = its FLOPs / the engine's median time / the
    fma peak's median."""
    for r in rows:
        if r.get("flops"):
            for e in engines.ENGINES:
                r[f"{e}_peak_fraction"] = r["flops"] / (r[f"{e}_ms"]["median"] / 1e3) / (peak["median"] * 1e9)


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"Prefill, {s['threads']} threads per engine, each engine alone in its own process, "
             f"alternated; medians over {s['rounds']} rounds of at least {s['runs']} runs and "
             f"{s.get('min_ms', 0):.0f} ms each (min–max of the rounds' medians). "
             f"Ratio = ORT / polyport per round; fastest rounds = ORT's fastest round / polyport's.", "",
             "| model | batch | seq | ORT ms | polyport ms | ORT / polyport | fastest rounds | polyport, of FMA peak "
             "| ORT, of FMA peak |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["prefill"]:
        if "skip" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | – | – | not measured: {r['skip']} "
                         "| – | – | – |")
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {fmt_ms(r['ort_ms'])} | "
                         f"{fmt_ms(r['polyport_ms'])} | {fmt_ratio(r['ratio'])} | {r['ratio_best']:.2f}x | "
                         f"{fmt_fraction(r, 'polyport')} | {fmt_fraction(r, 'ort')} |")
    bw, peak = doc["bandwidth_gbps"], doc.get("fma_gflops")
    lines += ["", f"Memory bandwidth in the same run (STREAM triad, {s['threads']} threads): "
                  f"{bw['median']:.1f} GB/s ({bw['min']:.1f}–{bw['max']:.1f})."]
    if peak:
        lines.append(f"Multiply-add peak in the same run (fma kernel, {s['threads']} threads, f32): "
                     f"{peak['median']:.0f} GFLOP/s ({peak['min']:.0f}–{peak['max']:.0f}); an engine's fraction "
                     "of it = the cost model's FLOPs of one forward / its median time / the peak's median.")
    if doc["decode"]:
        lines += ["", "Decode (batch 1; ttft = `start(prompt)`, tpot = one `append`; roofline fraction = (bytes "
                      "one step reads: the weights a token uses + the cache, from the artifact's cost model) / the "
                      "triad's bandwidth / tpot; above 100% the bytes stay in cache, as a tiny model's do):"]
    for model, d in doc["decode"].items():
        if "skip" in d:
            lines.append(f"- {model}: not measured: {d['skip']}")
            continue
        lines += ["", "| model | measure | tokens | ms | roofline fraction |", "|---|---|---|---|---|"]
        for r in d["rows"]:
            if "skip" in r:
                lines.append(f"| {model} | {r['kind']} | {r['length']} | – | not measured: {r['skip']} |")
            else:
                frac = f"{r['roofline_fraction']:.0%}" if "roofline_fraction" in r else "–"
                lines.append(f"| {model} | {r['kind']} | {r['length']} | {fmt_ms(r['ms'])} | {frac} |")
    if "coexist" in doc:
        c = doc["coexist"]
        lines += ["", f"Coexistence ({c['seq']} tokens, one process; each engine's speed as a fraction of its speed "
                      "alone in that process; median over rounds, min–max):"]
        for name, v in c["fractions"].items():
            lines.append(f"- {name}: {v['median']:.0%} ({v['min']:.0%}–{v['max']:.0%})")
    return "\n".join(lines)


def decode_part(art: Path, onnx: Path, args, bandwidth: dict, log) -> dict:
    spec = {"kind": "decode", "onnx": str(onnx), "artifact": str(art), "threads": args.threads,
            "prompts": args.prompts, "contexts": args.contexts, "runs": 3, "steps": args.runs}
    probe = engines.run_child(spec)
    if "skip" in probe:
        log(f"{onnx.stem}: decode: {probe['skip']}")
        return probe
    results = [probe] + [engines.run_child(spec) for _ in range(args.rounds - 1)]
    from polyport.runtime.artifact import Artifact
    from polyport.runtime.bench import tpot_bytes
    manifest = Artifact(art).manifest
    cost, generation = manifest.get("cost") or {}, manifest.get("generation") or {}
    rows = []
    for k, first in enumerate(probe["rows"]):
        row = {"kind": first["kind"], "length": first["length"]}
        if "skip" in first:
            row["skip"] = first["skip"]
        else:
            row["ms"] = engines.spread([statistics.median(r["rows"][k]["times_ms"]) for r in results])
            if first["kind"] == "tpot" and "bytes" in cost:
                nbytes = tpot_bytes(cost, generation, first["length"])
                row["roofline_fraction"] = nbytes / (bandwidth["median"] * 1e9) / (row["ms"]["median"] / 1e3)
        rows.append(row)
    return {"rows": rows}


def bench_doc(doc: dict, arts: dict, estimate: bool) -> dict:
    """The measured rows as a `polyport bench` document (rows name their model), plus roofline rows."""
    from polyport.runtime import bench
    cpu = bench.machine_info()["cpu"]
    rows = []
    for r in doc["prefill"]:
        if "skip" in r or r["batch"] != 1:
            continue
        p = r["polyport_ms"]
        rows.append({"model": r["model"], "target": "cpu", "device": cpu, "seq": r["seq"], "kind": "measured",
                     "median_ms": p["median"], "p90_ms": None, "spread_ms": p["max"] - p["min"], "runs": p["n"],
                     "ort_ms": r["ort_ms"]["median"], "ratio_vs_ort": r["ratio"]["median"],
                     "ratio_min": r["ratio"]["min"], "ratio_max": r["ratio"]["max"],
                     "ratio_best": r["ratio_best"]})
    if estimate:
        seqs = sorted({r["seq"] for r in doc["prefill"]})
        for model, art in arts.items():
            est = bench.bench(art, list(bench.ESTIMATED_TARGETS), seqs)
            rows += [{"model": model, **row} for row in est["rows"] if row["kind"] == "estimated"]
    return {"schema": bench.SCHEMA, "model": "corpus", "machine": bench.machine_info(), "spread": "range of rounds",
            "runs": doc["settings"]["rounds"], "warmup": doc["settings"]["warmup"], "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="artifacts (cached) and the JSON go here")
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                    help="corpus names (examples/models/NAME.onnx) or paths to .onnx files")
    ap.add_argument("--seq", type=int, nargs="+", default=[1, 16, 128, 512])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-ms", type=float, default=300.0,
                    help="prefill: time runs until this much wall time is sampled per shape (short calls get more runs)")
    ap.add_argument("--threads", type=int, default=None, help="per engine (default: the CPUs this process may use)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096], help="decode: context lengths")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="decode: prompt lengths for TTFT")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-coexist", action="store_true")
    ap.add_argument("--targets", nargs="+", default=["cpu"], help="compile the artifacts for these targets")
    ap.add_argument("--json", type=Path, default=None, help="default: WORK_DIR/compare.json")
    ap.add_argument("--bench-json", type=Path, default=None, help="also write a `polyport bench` document")
    ap.add_argument("--estimate-targets", action="store_true",
                    help="with --bench-json: add roofline rows for cuda, rocm and ascend")
    args = ap.parse_args(argv)
    log = lambda msg: print(f"compare: {msg}", file=sys.stderr, flush=True)    # noqa: E731
    from polyport.runtime import bench
    from polyport.devices import usable_cpus
    args.threads = args.threads or usable_cpus()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    paths = {Path(m).stem: engines.corpus_path(m) for m in args.models}
    arts = {name: engines.compile_cached(p, args.work_dir, log, args.targets, generation=not args.no_decode)
            for name, p in paths.items()}
    shapes = [[b, s] for b in args.batch for s in args.seq]
    common = {"kind": "prefill", "shapes": shapes, "runs": args.runs, "warmup": args.warmup,
              "min_ms": args.min_ms, "threads": args.threads}
    # The machine's bandwidth and multiply-add peak, measured in the same rounds as the first model's engines.
    machine = [{"kind": "triad", "threads": args.threads, "runs": 5, "warmup": 1},
               {"kind": "fma", "threads": args.threads, "runs": 5, "warmup": 1}]
    prefill, measured, failed = [], None, []
    for name, p in paths.items():
        specs = [dict(common, engine=e, onnx=str(p), artifact=str(arts[name])) for e in engines.ENGINES]
        try:
            results = engines.alternate(specs + (machine if measured is None else []), args.rounds, log)
        except RuntimeError as e:           # one engine cannot run this model here: rows that say why
            log(f"{name}: not measured: {e}")
            failed.append(name)
            prefill += [{"model": name, "batch": b, "seq": q, "skip": str(e).splitlines()[0]} for b, q in shapes]
            continue
        rows = engines.prefill_rows(name, dict(zip(engines.ENGINES, results)))
        for r in rows:
            if "skip" not in r:
                r["flops"] = engines.prefill_flops(str(p), arts[name], r["batch"], r["seq"])
        prefill += rows
        if measured is None:
            measured = results[len(specs):]
    if measured is None:
        measured = engines.alternate(machine, args.rounds, log)
    doc = {"benchmark": "compare", "machine": bench.machine_info(),
           "settings": {"threads": args.threads, "rounds": args.rounds, "runs": args.runs, "warmup": args.warmup,
                        "min_ms": args.min_ms,
                        "ort": "CPUExecutionProvider, ORT_ENABLE_ALL"},
           "prefill": prefill, "bandwidth_gbps": engines.spread([statistics.median(r["gbps"]) for r in measured[0]]),
           "fma_gflops": engines.spread([statistics.median(r["gflops"]) for r in measured[1]]), "decode": {}}
    peak_fractions(prefill, doc["fma_gflops"])
    if not args.no_decode:
        for name, p in paths.items():
            doc["decode"][name] = decode_part(arts[name], p, args, doc["bandwidth_gbps"], log)
    if not args.no_coexist:
        first = next(iter(paths))
        doc["coexist"] = engines.run_child({"kind": "coexist", "onnx": str(paths[first]),
                                            "artifact": str(arts[first]), "threads": args.threads,
                                            "rounds": args.rounds})
    doc["seconds"] = time.perf_counter() - start
    print(markdown(doc))
    out = args.json or args.work_dir / "compare.json"
    bench.write_json(out, doc)
    log(f"wrote {out} ({doc['seconds']:.0f} s)")
    if args.bench_json:
        bench.write_json(args.bench_json, bench_doc(doc, arts, args.estimate_targets))
        log(f"wrote {args.bench_json}")
    if failed:                      # the table says why; the exit status keeps a crash from passing a gate
        log(f"error: not measured: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

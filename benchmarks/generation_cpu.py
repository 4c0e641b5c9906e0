#!/usr/bin/env python
"""Time to first token and time per output token on the cpu target, against cache-less recompute.

    python benchmarks/generation_cpu.py ART [--context 128 1024] [--tokens 16] [--rounds 3]

ART is a cpu artifact (`polyport compile MODEL --target cpu -o ART`). For each context C:
- cached: `s.start(prompt of C tokens)` is the time to first token (prefill + the last row's
  logits); then `g.append(token)` one token at a time, --tokens steps: the time per output token
  (median of the steps);
- recompute: one full forward `s.run` over C + 1 tokens, what each new token costs without a cache.
Each engine runs alone in its own process (this script re-runs itself with --engine), the two
alternate for --rounds rounds, and the report gives the median over rounds of each process's
median. Threads: the cpu session's policy (runtime/cpu_session.py). The machine may be shared:
compare cached with recompute, not absolute times across machines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np


def measure(art: str, engine: str, context: int, tokens: int) -> dict:
    import polyport
    s = polyport.load(art, target="cpu")
    vocab = int((s.generation or {}).get("vocab") or 256)
    rng = np.random.default_rng(context)
    ids = rng.integers(0, vocab, size=(1, context + tokens + 1), dtype=np.int64)
    if engine == "recompute":
        feeds = {s.input_names[0]: ids[:, :context + 1]}
        s.run(feeds)                                            # warm-up
        times = []
        for _ in range(max(3, tokens // 4)):
            t0 = time.perf_counter()
            s.run(feeds)
            times.append(time.perf_counter() - t0)
        return {"recompute_ms": 1e3 * statistics.median(times)}
    s.start(ids[:, :context], max_length=context + tokens + 1).append(ids[:, context])     # warm-up
    t0 = time.perf_counter()
    g = s.start(ids[:, :context], max_length=context + tokens + 1)
    ttft = time.perf_counter() - t0
    steps = []
    for t in range(tokens):
        t0 = time.perf_counter()
        g.append(ids[:, context + t])
        steps.append(time.perf_counter() - t0)
    return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * statistics.median(steps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", choices=["cached", "recompute"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        print(json.dumps(measure(args.artifact, args.engine, args.context[0], args.tokens)))
        return 0
    rows = []
    for c in args.context:
        got: dict[str, list[float]] = {}
        for r in range(args.rounds):
            order = ["cached", "recompute"] if r % 2 == 0 else ["recompute", "cached"]
            for engine in order:
                out = subprocess.run([sys.executable, __file__, args.artifact, "--engine", engine, "--context", str(c),
                                      "--tokens", str(args.tokens)], check=True, capture_output=True, text=True)
                for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    got.setdefault(k, []).append(v)
        row = {"context": c, **{k: round(statistics.median(v), 2) for k, v in got.items()}}
        row["recompute_over_tpot"] = round(row["recompute_ms"] / row["tpot_ms"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

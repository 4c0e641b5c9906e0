#!/usr/bin/env python
"""Time to first token and time per output token on the cpu target, against cache-less recompute.

    python benchmarks/generation_cpu.py ART [--context 128 1024] [--batch 1 8] [--tokens 16] [--rounds 3]

ART is a cpu artifact (`polyport compile MODEL --target cpu -o ART`). For each context C:
- cached: `s.start(prompt of C tokens)` is the time to first token (prefill + the last row's
  logits); then `g.append(token)` one token at a time, --tokens steps: the time per output token
  (median of the steps); with --batch B, B prompts of C tokens decode together (one prefill and
  one decode call per step where the programs are batch-generic): `tok_s` = B / tpot;
- recompute: one full forward `s.run` over C + 1 tokens, what each new token costs without a cache.
Each engine runs alone in its own process (this script re-runs itself with --engine), the two
alternate for --rounds rounds, and the report gives the median over rounds of each process's
median. TVM_NUM_THREADS is the CPU count (runtime/cpu_session.py). The machine may be shared:
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


def measure(art: str, engine: str, context: int, tokens: int, batch: int = 1) -> dict:
    import polyport
    s = polyport.load(art, target="cpu")
    vocab = int((s.generation or {}).get("vocab") or 256)
    rng = np.random.default_rng(context)
    ids = rng.integers(0, vocab, size=(batch, context + tokens + 1), dtype=np.int64)
    if engine == "recompute":
        feeds = {s.input_names[0]: ids[:1, :context + 1]}
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
    tpot = statistics.median(steps)
    return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * tpot, "tok_s": batch / tpot}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences decoded together (cached)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", choices=["cached", "recompute"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        print(json.dumps(measure(args.artifact, args.engine, args.context[0], args.tokens, args.batch[0])))
        return 0
    runs = [("cached", b) for b in args.batch] + [("recompute", 1)]
    for c in args.context:
        got: dict[tuple[str, int], dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for engine, b in runs[r % len(runs):] + runs[:r % len(runs)]:      # each round starts elsewhere
                out = subprocess.run([sys.executable, __file__, args.artifact, "--engine", engine, "--context", str(c),
                                      "--tokens", str(args.tokens), "--batch", str(b)],
                                     check=True, capture_output=True, text=True)
                for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    got.setdefault((engine, b), {}).setdefault(k, []).append(v)
        recompute = statistics.median(got[("recompute", 1)]["recompute_ms"])
        for b in args.batch:
            row = {"context": c, "batch": b,
                   **{k: round(statistics.median(v), 2) for k, v in got[("cached", b)].items()},
                   "recompute_ms": round(recompute, 2)}
            row["recompute_over_tpot"] = round(recompute * b / row["tpot_ms"], 1)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

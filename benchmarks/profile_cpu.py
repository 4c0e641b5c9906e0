#!/usr/bin/env python
"""Where a cpu artifact's time goes, kernel by kernel (TVM's Relax VM profiler), at given lengths.

    python benchmarks/profile_cpu.py ART [--seq 128 512] [--top 12]
    python benchmarks/profile_cpu.py ART --decode 128 1024       # one decode step (`append`) at each context

Instruments the session's Relax VM (a wall-clock timer around every call instruction; builtins
such as allocations included), runs it --runs times, and prints each function's share of the
total (summed over calls, median over runs), largest first. The timer costs a Python call per
instruction, so read shares, not absolute times.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def profile(art: str, seq: int, runs: int, decode: bool = False) -> dict[str, float]:
    """{function: median over runs of its summed wall-clock ms per run}: a prefill of `seq` tokens, or
    with `decode` one decode step with `seq` tokens cached."""
    import time
    from polyport.runtime.session import load
    s = load(art, "cpu")
    ids = np.random.default_rng(0).integers(0, 100, (1, seq), dtype=np.int64)
    if decode:
        state = s.start(ids, max_length=seq + runs + 4)
        token = np.zeros(1, np.int64)
        step = lambda: state.append(token)          # noqa: E731
    else:
        step = lambda: s.run({"input_ids": ids})    # noqa: E731
    for _ in range(3):
        step()
    per_run: list[dict[str, float]] = []
    started: dict[str, float] = {}

    def instrument(func, name, before, ret, *args):
        now = time.perf_counter()
        if before:
            started[name] = now
        else:
            per_run[-1][name] = per_run[-1].get(name, 0.0) + (now - started.pop(name)) * 1e3
        return 0        # VMInstrumentReturnKind.NO_OP: run the call

    s._function("main")
    s._local.fns[""].set_instrument(instrument)       # this thread's VM (runtime/vm_session.py)
    for _ in range(runs):
        per_run.append({})
        step()
    names = {n for r in per_run for n in r}
    return {n: float(np.median([r.get(n, 0.0) for r in per_run])) for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--decode", type=int, nargs="+", default=[], metavar="CONTEXT",
                    help="profile one decode step at these contexts instead of prefill")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    from polyport.errors import PolyportError
    for seq in args.decode or args.seq:
        try:
            rows = profile(args.artifact, seq, args.runs, decode=bool(args.decode))
        except PolyportError as e:           # not an artifact, no cpu entry, ...: one line, no traceback
            print(f"profile_cpu: {e}", file=sys.stderr)
            return 2
        total = sum(rows.values())
        what = f"decode step at context {seq}" if args.decode else f"seq {seq}"
        print(f"{what}: {total:.2f} ms in VM calls (median run, instrumented)")
        for name, ms in sorted(rows.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {ms / total:6.1%}  {ms:8.3f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

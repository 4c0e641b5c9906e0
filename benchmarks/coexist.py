#!/usr/bin/env python
"""Thread pools sharing one process: polyport's speed next to ONNX Runtime and NumPy, against alone.

    python benchmarks/coexist.py --work-dir DIR [--model llama_a] [--seq 512] [--rounds 3] [--runs 20]

A server runs a tokenizer, NumPy/BLAS post-processing or a second ORT model
in the same process as polyport. Their thread pools spin after each call
(ORT's intra-op threads, OpenBLAS's, TVM's workers), so whatever runs next
competes with spinning threads. In one process (polyport's session created
first, ORT's after it: the order that would inherit a pin) this measures, per
round, each as a fraction of the same engine's speed alone (back to back, the
same process, nothing else running):
- polyport right after an ORT run, in the same thread (ORT's pool spinning);
- polyport right after a NumPy matmul (OpenBLAS's pool spinning);
- polyport while another thread does NumPy work half the time (1 ms on, 1 ms off);
- ORT right after a polyport run (TVM's workers spinning: does polyport slow others?).
It also checks that the calling thread's CPU affinity, and that of a thread
started afterwards, are what they were before polyport ran.

Medians over rounds, with min..max. The seq defaults to 512: at shorter
lengths the corpus' small models run their kernels serially
(targets/kernels/cpu/parallel.py), so TVM's pool would not be exercised.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engines  # noqa: E402

SCENARIOS = ("polyport after ORT", "polyport after NumPy matmul", "polyport beside a NumPy thread (50% busy)",
             "ORT after polyport")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_ms(fn, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs)) * 1e3


class NumpyThread:
    """A thread doing NumPy work for `on_s`, then sleeping `off_s`, until stopped."""

    def __init__(self, on_s: float = 1e-3, off_s: float = 1e-3):
        import numpy as np
        self.x = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
        self.on_s, self.off_s, self.stop = on_s, off_s, threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        import numpy as np
        while not self.stop.is_set():
            end = time.perf_counter() + self.on_s
            while time.perf_counter() < end:
                np.tanh(self.x, out=self.x)
            time.sleep(self.off_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def affinity_of_new_thread() -> set:
    box = {}
    t = threading.Thread(target=lambda: box.update(a=os.sched_getaffinity(0)))
    t.start()
    t.join()
    return box["a"]


def measure(onnx: str, artifact: str, threads: int, seq: int = 512, rounds: int = 3, runs: int = 20) -> dict:
    """{"alone_ms": {...}, "fractions": {scenario: spread}, "affinity_kept": bool, ...} (see the docstring)."""
    import numpy as np
    before = os.sched_getaffinity(0)
    pp_run, _ = engines.open_engine("polyport", onnx, artifact, threads)
    ort_run, _ = engines.open_engine("ort", onnx, None, threads)
    ids = engines.token_ids(onnx, 1, seq)
    a = np.random.default_rng(1).standard_normal((384, 384)).astype(np.float32)
    pp = lambda: pp_run(ids)          # noqa: E731
    ort = lambda: ort_run(ids)        # noqa: E731
    for _ in range(3):
        pp(), ort(), a @ a
    alone = {"polyport": [], "ort": []}
    fractions = {s: [] for s in SCENARIOS}
    for _ in range(rounds):
        pp_alone = _median_ms(lambda: _timed(pp), runs)
        ort_alone = _median_ms(lambda: _timed(ort), runs)
        alone["polyport"].append(pp_alone)
        alone["ort"].append(ort_alone)
        after_ort = _median_ms(lambda: (ort(), _timed(pp))[1], runs)
        after_np = _median_ms(lambda: (a @ a, _timed(pp))[1], runs)
        with NumpyThread():
            beside_np = _median_ms(lambda: _timed(pp), runs)
        ort_after = _median_ms(lambda: (pp(), _timed(ort))[1], runs)
        for s, t, base in zip(SCENARIOS, (after_ort, after_np, beside_np, ort_after),
                              (pp_alone, pp_alone, pp_alone, ort_alone)):
            fractions[s].append(base / t)
    return {"seq": seq, "threads": threads, "rounds": rounds, "runs": runs,
            "alone_ms": {k: engines.spread(v) for k, v in alone.items()},
            "fractions": {k: engines.spread(v) for k, v in fractions.items()},
            "affinity_kept": os.sched_getaffinity(0) == before and affinity_of_new_thread() == before,
            "tvm_env": {k: os.environ.get(k) for k in ("TVM_NUM_THREADS", "TVM_BIND_THREADS",
                                                       "TVM_THREAD_POOL_SPIN_COUNT")}}


def child_coexist(spec: dict) -> dict:
    return measure(spec["onnx"], spec["artifact"], spec["threads"], spec.get("seq", 512), spec["rounds"],
                   spec.get("runs", 20))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="the artifact is compiled (cached) here")
    ap.add_argument("--model", default="llama_a")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    from polyport.devices import usable_cpus
    log = lambda msg: print(f"coexist: {msg}", file=sys.stderr, flush=True)    # noqa: E731
    onnx = engines.corpus_path(args.model)
    art = engines.compile_cached(onnx, args.work_dir, log, generation=False)   # it times run() only
    out = engines.run_child({"kind": "coexist", "onnx": str(onnx), "artifact": str(art), "threads": usable_cpus(),
                             "seq": args.seq, "rounds": args.rounds, "runs": args.runs})
    print(f"{args.model} seq {args.seq}, {out['threads']} threads, alone: polyport "
          f"{out['alone_ms']['polyport']['median']:.3g} ms, ORT {out['alone_ms']['ort']['median']:.3g} ms")
    for name, v in out["fractions"].items():
        print(f"  {name}: {v['median']:.0%} of alone ({v['min']:.0%}-{v['max']:.0%})")
    print(f"  caller's affinity unchanged: {out['affinity_kept']}; TVM env: {out['tvm_env']}")
    return 0 if out["affinity_kept"] else 1


if __name__ == "__main__":
    sys.exit(main())

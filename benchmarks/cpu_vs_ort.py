"""Time polyport's cpu target against ONNX Runtime on the same .onnx (interleaved batches, medians).

    python benchmarks/cpu_vs_ort.py examples/models/llama_a.onnx [--seqs 1,16,128] [--art DIR]

The ORT session is created first (TVM pins the calling thread on its first parallel
call and later pools inherit it); runs alternate in batches with a gap so TVM's
spinning workers do not slow ORT's timings
(and ORT's do not slow ours).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seqs", default="1,16,128")
    ap.add_argument("--art", default=None)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    ref = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
    from polyport.compiler import compile_model
    from polyport.runtime.session import load
    art = Path(a.art or tempfile.mkdtemp()) / Path(a.model).stem
    if not (art / "manifest.json").exists():
        t = time.perf_counter()
        compile_model(a.model, ["cpu"], art)
        print(f"compile {a.model}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    sess = load(art, "cpu")
    for seq in [int(s) for s in a.seqs.split(",")]:
        ids = np.random.default_rng(seq).integers(0, 200, size=(1, seq), dtype=np.int64)
        feeds = {"input_ids": ids}
        for _ in range(3):
            ref.run(None, feeds)
            time.sleep(0.2)
            sess.run(feeds)
        t_ort, t_pp = [], []
        for _ in range(a.reps):
            time.sleep(0.2)
            t = time.perf_counter(); ref.run(None, feeds); t_ort.append(time.perf_counter() - t)
            time.sleep(0.2)        # ORT's intra-op threads spin after a run too: let them park first
            t = time.perf_counter(); sess.run(feeds); t_pp.append(time.perf_counter() - t)
        mo, mp = statistics.median(t_ort) * 1e3, statistics.median(t_pp) * 1e3
        print(f"{Path(a.model).stem:16s} seq={seq:4d}  ort {mo:8.3f} ms  polyport {mp:8.3f} ms  speedup {mo / mp:5.2f}x")


if __name__ == "__main__":
    main()

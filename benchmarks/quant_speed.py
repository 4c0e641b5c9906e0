"""One int4 MatMulNBits layer (ORT's quantizer, block 32) at LLM sizes: polyport cpu vs ONNX Runtime.

    PYTHONPATH=... python benchmarks/quant_speed.py [--k 2048] [--n 2048] [--seq 1 128] [--rounds 5]
                                                     [--runs 20] [--work-dir DIR]

Each engine runs alone in its own process (a fresh one per round, engines alternating, ORT first in
odd rounds); a process times --runs calls after 3 warm-up calls and reports its median. The table
holds the median over rounds of those medians, per engine and sequence length (threads: the CPU
count for both). The machine is shared: read the ratio, not the absolute times.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def build(work: pathlib.Path, k: int, n: int) -> tuple[pathlib.Path, pathlib.Path]:
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from polyport.compiler import compile_model
    path = work / f"linear_{k}x{n}_int4_b32.onnx"
    art = work / f"{path.stem}_art"
    if not path.exists():
        w = (np.random.default_rng(0).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", n])],
                              [onnx.numpy_helper.from_array(w, "w")])
        m = helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])
        q = MatMulNBitsQuantizer(m, algo_config=DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True))
        q.process()
        onnx.save(q.model.model, path)
    if not (art / "manifest.json").exists():
        compile_model(path, ["cpu"], art)
    return path, art


def child(engine: str, path: str, art: str, seq: int, runs: int) -> None:
    threads = len(os.sched_getaffinity(0))
    x = np.random.default_rng(seq).standard_normal((1, seq, int(pathlib.Path(path).name.split("_")[1].split("x")[0]))).astype(np.float32)
    if engine == "ort":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        call = lambda: sess.run(None, {"x": x})  # noqa: E731
    else:
        os.environ["TVM_NUM_THREADS"] = str(threads)
        from polyport.runtime import session
        sess = session.load(art, "cpu")
        call = lambda: sess.run({"x": x})  # noqa: E731
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    print(json.dumps({"median_ms": statistics.median(times) * 1e3}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seq", type=int, nargs="*", default=[1, 128])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--child", nargs=5, metavar=("ENGINE", "PATH", "ART", "SEQ", "RUNS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        engine, path, art, seq, runs = a.child
        return child(engine, path, art, int(seq), int(runs))
    work = pathlib.Path(a.work_dir or os.path.join(tempfile.gettempdir(), "polyport_quant_speed"))
    work.mkdir(parents=True, exist_ok=True)
    path, art = build(work, a.k, a.n)
    print(f"| K x N | seq | ORT MatMulNBits ms | polyport ms | ORT / polyport |")
    print("|---|---|---|---|---|")
    for seq in a.seq:
        res = {"ort": [], "polyport": []}
        for r in range(a.rounds):
            for engine in (("ort", "polyport") if r % 2 == 0 else ("polyport", "ort")):
                out = subprocess.run([sys.executable, __file__, "--child", engine, str(path), str(art), str(seq),
                                      str(a.runs)], capture_output=True, text=True, check=True)
                res[engine].append(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])
        o, p = statistics.median(res["ort"]), statistics.median(res["polyport"])
        print(f"| {a.k} x {a.n} | {seq} | {o:.3f} | {p:.3f} | {o / p:.2f} |", flush=True)


if __name__ == "__main__":
    main()

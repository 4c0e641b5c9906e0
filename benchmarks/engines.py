"""Engines timed alone: polyport's cpu artifact and ONNX Runtime (CPU EP), each in its own process.

A benchmark that runs two thread pools in one process measures their fight
(TVM_NOTES.md: TVM's workers spin ~150 ms after a call and slow whatever runs
next; ORT's spin too), and a gap between runs hides it. So here every
measurement is a child process that loads ONE engine, warms it up, times its
runs and exits; the driver starts the children one after another, never two at
once, alternating the engines' order each round (A B, B A, A B, ...). Each
engine gets the same threads (the CPUs this process may use). Results are the
medians of each child's runs; across rounds the driver reports the median and
the spread (min..max) of those medians and of the per-round ratios.

Children (`python benchmarks/engines.py --child JSON`, one JSON line on stdout):
- `prefill`: engine "polyport" or "ort" over one model at every (batch, seq);
  a (batch, seq) the model cannot take (a batch fixed in the export) comes
  back as a row with "skip" and the reason.
- `triad`: STREAM triad a = b + 3c over three 64 MiB float32 arrays, a
  parallel, vectorised TVM kernel on the same threads; GB/s counts 12 bytes
  per element (read b, c; write a), as STREAM does.
- `fma`: the machine's float32 multiply-add peak on the same threads: a TVM
  kernel for this CPU (its widest vectors) whose tasks each update 12
  independent vector accumulators in registers; GFLOP/s counts 2 per lane.
  Prefill is bound by it as decode is by the triad.
- `coexist`: coexist.py's measurement (thread pools sharing one process).
- `decode`: time to first token (`s.start(prompt)`) and time per output token
  (`g.append(token)` at a given context) through the cpu session's generation
  API, over `batch` sequences (default 1; one `append` steps them all); without
  that API the child says so and the driver prints a skip.

`compare.py` is the command line; `coexist.py` measures thread pools sharing
one process (the opposite experiment, on purpose).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CORPUS = ("llama_a", "mixtral_a", "qwen3_moe_a", "deepseek_v3_a", "deepseek_v4_a")
ENGINES = ("polyport", "ort")
TRIAD_ELEMENTS = 1 << 24            # 64 MiB per float32 array: far past any cache here


class Skip(Exception):
    """A row that cannot be measured, with the reason printed in its place."""


# ---- artifacts (driver side) ---------------------------------------------------------------
def corpus_path(name: str) -> Path:
    """A corpus name (examples/models/NAME.onnx) or a path to an .onnx file."""
    path = EXAMPLES / "models" / f"{name}.onnx" if name in CORPUS or not name.endswith(".onnx") else Path(name)
    if not path.exists():
        raise SystemExit(f"engines: error: {name}: no such model {path}")
    return path


def source_digest() -> str:
    """sha256 over polyport's Python sources (tests, benchmarks, examples and hidden folders left out)."""
    h = hashlib.sha256()
    for f in sorted(REPO.rglob("*.py")):
        rel = f.relative_to(REPO)
        if rel.parts[0] in ("tests", "benchmarks", "examples") or rel.parts[0].startswith("."):
            continue
        h.update(str(rel).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def compile_cached(onnx_path: Path, work_dir: Path, log: Callable[[str], None],
                   targets: Sequence[str] = ("cpu",), generation: bool = True, quantization=None) -> Path:
    """The artifact for `onnx_path`, compiled into work_dir unless one from the same ONNX file, the same
    polyport sources, the same targets, (with `generation`) the decode programs and the same weight
    quantization (a passes.quantize_weights.WeightQuantization, or None for f32) is there (a changed
    kernel is never timed through a stale build). Each quantization scheme has its own artifact."""
    from polyport.compiler import compile_model
    from polyport.runtime.artifact import sha256
    q = quantization
    art = work_dir / "artifacts" / (onnx_path.stem + (f".{q.scheme}" if q else "") + ("" if generation else ".main"))
    stamp = art.with_name(art.name + ".source")
    digest = f"{sha256(onnx_path)} {source_digest()} {','.join(targets)}{'' if generation else ' no-generation'}"
    if q:
        digest += f" {q.scheme} group {q.group_size}{' lm-head' if q.lm_head else ''}" \
                  f"{' embeddings' if q.embeddings else ''}"
    if (art / "manifest.json").exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return art
    art.parent.mkdir(parents=True, exist_ok=True)
    what = f"{onnx_path.name}{f' ({q.scheme}, groups of {q.group_size})' if q else ''}"
    log(f"compiling {what} for {', '.join(targets)}")
    t0 = time.perf_counter()
    compile_model(onnx_path, list(targets), art, progress=lambda msg: None, generation=generation,
                  quantization=q, replace=True)        # a stale build of ours: its targets are rebuilt here
    stamp.write_text(digest + "\n")
    log(f"compiled {what} in {time.perf_counter() - t0:.1f} s")
    return art


def prefill_flops(onnx_path: str, artifact: Path, batch: int, seq: int) -> Optional[int]:
    """FLOPs of one forward over input_ids [batch, seq] by the artifact's cost model (runtime/cost.py:
    matmuls, causal attention halved, routed experts at top-k), or None when it cannot say: no cost in
    the manifest, or a symbol of it that is not one of input_ids' dims."""
    import onnx
    from polyport.ir.symbolic import SymExpr, parse
    from polyport.runtime.artifact import Artifact
    from polyport.runtime.cost import evaluate
    cost = Artifact(artifact).manifest.get("cost") or {}
    if "flops" not in cost:
        return None
    graph = onnx.load(onnx_path, load_external_data=False).graph
    dims = next(i for i in graph.input if i.name == "input_ids").type.tensor_type.shape.dim
    bindings = {d.dim_param: n for d, n in zip(dims, (batch, seq)) if d.dim_param}
    poly = parse(cost["flops"])
    if isinstance(poly, SymExpr) and not poly.symbols <= set(bindings):
        return None
    return evaluate(poly, bindings)


# ---- inside a child ------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], runs: int, warmup: int, min_ms: float = 0.0) -> list[float]:
    """Wall-clock ms of at least `runs` calls, and of as many more as fill `min_ms` of timed calls, after
    `warmup` untimed ones (also extended to fill min_ms / 4). A sub-millisecond call's median over ten runs
    moves by a third between processes (caches and thread pools still warming); over a fixed wall time
    it does not."""
    begin = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - begin) * 1e3 < min_ms / 4:
        fn()
        done += 1
    times: list[float] = []
    total = 0.0
    while len(times) < runs or total < min_ms:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        total += times[-1]
    return times


def token_ids(onnx_path: str, batch: int, seq: int):
    """input_ids [batch, seq] for an LLM export whose only input is input_ids [batch | 1, seq]."""
    import numpy as np
    import onnx
    graph = onnx.load(onnx_path, load_external_data=False).graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != ["input_ids"]:
        raise Skip(f"{Path(onnx_path).name}: inputs {[i.name for i in inputs]}; this benchmark feeds input_ids only")
    dims = inputs[0].type.tensor_type.shape.dim
    fixed_batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
    if fixed_batch is not None and fixed_batch != batch:
        raise Skip(f"the export fixes batch at {fixed_batch}")
    return np.random.default_rng(0).integers(0, 100, size=(batch, seq), dtype=np.int64)


def open_engine(engine: str, onnx_path: str, artifact: Optional[str], threads: int):
    """(run(ids), session) for one engine, on `threads` threads."""
    if engine == "ort":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        name = sess.get_outputs()[0].name
        return (lambda ids: sess.run([name], {"input_ids": ids})[0]), sess
    if engine == "polyport":
        from polyport.runtime.session import load
        sess = load(artifact, "cpu", threads=threads)
        return (lambda ids: next(iter(sess.run({"input_ids": ids}).values()))), sess
    raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")


def child_prefill(spec: dict) -> dict:
    run, _ = open_engine(spec["engine"], spec["onnx"], spec.get("artifact"), spec["threads"])
    rows = []
    for batch, seq in spec["shapes"]:
        row = {"batch": batch, "seq": seq}
        try:
            ids = token_ids(spec["onnx"], batch, seq)
            row["times_ms"] = time_calls(lambda: run(ids), spec["runs"], spec["warmup"], spec.get("min_ms", 0.0))
        except Skip as e:
            row["skip"] = str(e)
        rows.append(row)
    return {"rows": rows}


def child_triad(spec: dict) -> dict:
    """GB/s of each timed STREAM-triad call (one TVM kernel, `threads` threads, 12 bytes per element)."""
    os.environ["TVM_NUM_THREADS"] = str(spec["threads"])
    import numpy as np
    import tvm
    from tvm.script import tirx as T
    n, chunk = TRIAD_ELEMENTS, 1 << 14

    @T.prim_func
    def triad(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32"), c: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "triad"})
        for o in T.parallel(n // chunk):
            for i in T.serial(chunk // 16):
                for v in T.vectorized(16):
                    a[o * chunk + i * 16 + v] = b[o * chunk + i * 16 + v] + T.float32(3.0) * c[o * chunk + i * 16 + v]

    fn = tvm.compile(tvm.IRModule({"triad": triad}), target=tvm.target.Target({"kind": "llvm"}))["triad"]
    a, b, c = (tvm.runtime.tensor(np.full(n, x, np.float32)) for x in (0.0, 1.0, 2.0))
    times = time_calls(lambda: fn(a, b, c), spec["runs"], spec["warmup"])
    if float(a.numpy()[n - 1]) != 7.0:
        raise RuntimeError("triad kernel computed a wrong value")
    return {"gbps": [12 * n / (t / 1e3) / 1e9 for t in times]}


FMA_TASKS, FMA_ACCUMULATORS, FMA_ITERS = 64, 12, 1 << 15


def child_fma(spec: dict) -> dict:
    """GFLOP/s of each timed call of a kernel that only multiplies and adds in registers: the peak every
    f32 GEMM on this CPU and these threads is bounded by. 12 accumulators cover the multiply-add units'
    latency (4 cycles x 2 units on Zen 3, 4 x 2 on recent Xeons); 64 tasks balance over the threads."""
    os.environ["TVM_NUM_THREADS"] = str(spec["threads"])
    import numpy as np
    import tvm
    from tvm.script import tirx as T
    from polyport.targets.cpu import host_mcpu
    from polyport.targets.kernels.cpu.isa import lanes_of
    mcpu = host_mcpu()
    tasks, acc_n, iters, lanes = FMA_TASKS, FMA_ACCUMULATORS, FMA_ITERS, lanes_of(mcpu)

    @T.prim_func
    def fma(out: T.Buffer((tasks, acc_n, lanes), "float32"), m: T.Buffer((lanes,), "float32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "fma"})
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((acc_n, lanes), "float32", scope="local")
            for a in T.unroll(acc_n):
                for v in T.vectorized(lanes):
                    acc[a, v] = T.float32(0.0)
            for _ in T.serial(iters):
                for a in T.unroll(acc_n):
                    for v in T.vectorized(lanes):
                        acc[a, v] = acc[a, v] * m[v] + T.float32(1.0)
            for a in T.unroll(acc_n):
                for v in T.vectorized(lanes):
                    out[t, a, v] = acc[a, v]

    fn = tvm.compile(tvm.IRModule({"fma": fma}), target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))["fma"]
    out = tvm.runtime.tensor(np.zeros((tasks, acc_n, lanes), np.float32))
    m = tvm.runtime.tensor(np.full(lanes, 0.5, np.float32))
    times = time_calls(lambda: fn(out, m), spec["runs"], spec["warmup"])
    if not np.allclose(out.numpy(), 2.0):          # x <- x / 2 + 1 converges to 2: the work was done
        raise RuntimeError("fma kernel computed a wrong value")
    flops = 2 * tasks * acc_n * lanes * iters
    return {"gflops": [flops / (t / 1e3) / 1e9 for t in times], "mcpu": mcpu}


def decode_tokens(batch: int, context: int, steps: int):
    """The token ids every engine's decode child feeds: row 0's first `context` are the prompt each of the
    `batch` sequences starts from, column context + t holds each sequence's token of step t (t = 0 warms up)."""
    import numpy as np
    return np.random.default_rng(0).integers(0, 100, (batch, context + steps + 1))


def child_decode(spec: dict) -> dict:
    """TTFT (`s.start(prompt)`) and TPOT (`state.append(tokens)` at a context) through the cpu session's
    generation API (runtime/generation.py), only where it runs the derived prefill/decode programs.
    `batch` prompts of each length start together. TPOT decodes llama_cpp.py's token stream, so that both
    engines' MoE steps read the same experts: one prompt in every sequence, then each append one token of
    each sequence's own (its ids[:, length + t])."""
    import numpy as np
    _, sess = open_engine("polyport", spec["onnx"], spec["artifact"], spec["threads"])
    if not callable(getattr(sess, "start", None)):
        return {"skip": "the cpu session has no start() (generation is not in this build)"}
    rng = np.random.default_rng(0)
    batch = spec.get("batch", 1)
    rows = []
    for kind, length in [("ttft", p) for p in spec["prompts"]] + [("tpot", c) for c in spec["contexts"]]:
        if kind == "ttft":
            prompt = rng.integers(0, 100, size=(batch, length), dtype=np.int64)
        else:
            ids = decode_tokens(batch, length, spec["steps"])
            prompt, steps = np.repeat(ids[:1, :length], batch, axis=0), iter(range(length, ids.shape[1]))
        room = length + spec["steps"] + 2
        row = {"kind": kind, "length": length}
        try:
            state = sess.start(prompt, max_length=room)
            if not state.cached:
                return {"skip": "the artifact has no decode programs for every layer (generation would recompute "
                                "the whole sequence each step)"}
            if kind == "ttft":
                row["times_ms"] = time_calls(lambda: sess.start(prompt, max_length=room), spec["runs"], 1)
            else:
                row["times_ms"] = time_calls(lambda: state.append(ids[:, next(steps)]), spec["steps"], 1)
        except Exception as e:  # noqa: BLE001 - one line per row; a context past the model's limit is expected
            text = str(e).strip()
            row["skip"] = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        rows.append(row)
    return {"rows": rows}


def child_coexist(spec: dict) -> dict:
    from coexist import child_coexist as run
    return run(spec)


CHILDREN = {"prefill": child_prefill, "triad": child_triad, "fma": child_fma, "decode": child_decode,
            "coexist": child_coexist}


def child_main(arg: str) -> int:
    spec = json.loads(arg)
    out = CHILDREN[spec["kind"]](spec)
    print(json.dumps(out), flush=True)
    return 0


# ---- the driver ----------------------------------------------------------------------------
def run_child(spec: dict, timeout_s: float = 1800.0) -> dict:
    """Run one child process to completion and return its JSON (the last line of its stdout)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        if proc.returncode >= 0:
            status = f"status {proc.returncode}"
        else:
            status = f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode == -signal.SIGKILL:
                status += " (the kernel's OOM killer sends it)"
        raise RuntimeError(f"{spec['kind']} child ({spec.get('engine', '')}) failed: {status}\n{tail}".rstrip())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(specs: Sequence[dict], rounds: int, log: Callable[[str], None]) -> list[list[dict]]:
    """results[i][r]: spec i's result in round r; the specs' order reverses every other round."""
    results: list[list[dict]] = [[] for _ in specs]
    for r in range(rounds):
        order = list(range(len(specs)))
        if r % 2:
            order.reverse()
        for i in order:
            log(f"round {r + 1}/{rounds}: {specs[i]['kind']} {specs[i].get('engine', '')} "
                f"{Path(specs[i].get('onnx', '')).stem}".rstrip())
            results[i].append(run_child(specs[i]))
    return results


def spread(values: Sequence[float]) -> dict:
    """median, min and max of per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def prefill_rows(model: str, rounds_by_engine: dict[str, list[dict]]) -> list[dict]:
    """Per (batch, seq): each engine's per-round medians, the per-round ratio ORT / polyport, and the ratio of
    the engines' fastest rounds."""
    rows = []
    first = rounds_by_engine["ort"][0]["rows"]
    for k, shape in enumerate(first):
        row = {"model": model, "batch": shape["batch"], "seq": shape["seq"]}
        skips = {e: rr[0]["rows"][k].get("skip") for e, rr in rounds_by_engine.items()}
        if any(skips.values()):
            row["skip"] = "; ".join(sorted({s for s in skips.values() if s}))
            rows.append(row)
            continue
        medians = {e: [statistics.median(r["rows"][k]["times_ms"]) for r in rr] for e, rr in rounds_by_engine.items()}
        for e, m in medians.items():
            row[f"{e}_ms"] = spread(m)
        row["ratio"] = spread([o / p for o, p in zip(medians["ort"], medians["polyport"])])
        # each engine's fastest round: interference only adds time, so on a shared host this one is steadier
        row["ratio_best"] = min(medians["ort"]) / min(medians["polyport"])
        rows.append(row)
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    print("engines.py is a library and the children's entry point; run benchmarks/compare.py", file=sys.stderr)
    sys.exit(2)

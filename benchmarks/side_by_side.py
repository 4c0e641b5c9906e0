#!/usr/bin/env python
"""polyport's cpu target vs ONNX Runtime (CPU EP), side by side, in one process.

    python benchmarks/side_by_side.py --work-dir /tmp/sbs [--models NAME ...] [--seq 1 16 128]
                                      [--runs 20] [--warmup 3] [--gap-ms 200] [--json FILE]
                                      [--no-big] [--export-only]

Models: the five corpus exports (examples/models/{llama,mixtral,qwen3_moe,
deepseek_v3,deepseek_v4}_a.onnx) and `deepseek_v3_200m`, a ~200M-parameter
DeepSeek-V3-style model (MLA, group-limited top-k MoE) exported on demand with
examples/export_hf.py's machinery into --work-dir (random weights, never
downloaded; cached: exported once). Artifacts are compiled here with
`polyport.compiler.compile_model(..., ["cpu"], ...)` into --work-dir (cached
by the ONNX file's hash and the hash of polyport's own sources, so a changed
kernel is never timed through a stale artifact).

How it times (TVM_NOTES.md's pitfalls):
- TVM_NUM_THREADS and ORT's intra_op_num_threads are both the CPU count;
  ORT runs with ORT_ENABLE_ALL.
- Every ORT session is created FIRST, before anything touches TVM: TVM pins
  the calling thread to CPU 0 on its first parallel call and thread pools
  created afterwards inherit the pin. The process affinity is also restored
  after every polyport run.
- Runs are interleaved (ORT, polyport, ORT, polyport, ... with the order
  alternating each round) and separated by --gap-ms of sleep: TVM's workers
  spin ~150 ms after each call and slow anything run inside that window.
- Medians of --runs timed runs after --warmup untimed ones. The machine is
  shared: read the ratio, not the absolute times.

Prints a table (ratio = ORT / polyport: above 1 means polyport is faster) and
writes JSON (--json, default WORK_DIR/side_by_side.json).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CORPUS = ("llama_a", "mixtral_a", "qwen3_moe_a", "deepseek_v3_a", "deepseek_v4_a")
BIG = "deepseek_v3_200m"
DEFAULT_SEQS = (1, 16, 128)

# ~200M parameters: embeddings 2 x 32000 x 1024 (65.5M) + 4 layers of MLA attention (~2.9M each)
# + 1 dense layer (8.7M) + 3 MoE layers of 24 experts x 3 x 1024 x 512 (+ a shared expert, router).
BIG_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=24, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
    first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
)


class Missing(RuntimeError):
    pass


def cpu_target_available() -> None:
    """Fail clearly when polyport's cpu target (targets/cpu.py + runtime/cpu_session.py) is not there."""
    from polyport.targets.base import target_names
    missing = []
    try:
        names = target_names()
    except Exception as e:  # noqa: BLE001 - a half-written target module: report it, do not hide it
        raise Missing(f"polyport's target registry fails to import ({type(e).__name__}: {e})") from e
    if "cpu" not in names:
        missing.append("targets/cpu.py (no registered 'cpu' target; registered: "
                       f"{', '.join(names) or 'none'})")
    if importlib.util.find_spec("polyport.runtime.cpu_session") is None:
        missing.append("runtime/cpu_session.py (no loader for load(ART, 'cpu'))")
    if missing:
        raise Missing("polyport's cpu target is missing: " + "; ".join(missing)
                      + ". This benchmark compares polyport cpu with ONNX Runtime and cannot run without it.")


# ---- the ~200M model, exported on demand ---------------------------------------------------
def export_big(work_dir: Path, log) -> Path:
    path = work_dir / f"{BIG}.onnx"
    stamp = work_dir / f"{BIG}.json"
    key = hashlib.sha256(json.dumps(BIG_CONFIG, sort_keys=True).encode()).hexdigest()
    if path.exists() and stamp.exists() and json.loads(stamp.read_text()).get("config_sha256") == key:
        return path
    from polyport.files import atomic_path
    sys.path.insert(0, str(EXAMPLES))
    try:
        import export_hf
    finally:
        sys.path.remove(str(EXAMPLES))
    spec = export_hf.ModelSpec(
        "deepseek_v3", "200m", "DeepseekV3Config", "DeepseekV3ForCausalLM",
        dict(export_hf.COMMON, **BIG_CONFIG), moe=True,
        description="~200M-parameter DeepSeek-V3-style benchmark model (MLA; 24 experts top-4, "
                    "4 groups / top-2; 1 shared expert; layer 0 dense)", path=path)
    log(f"exporting {BIG} (random weights) to {path}: this takes a few minutes, once")
    model, config, attn = export_hf.build_model(spec, "eager")
    params = sum(p.numel() for p in model.parameters())
    log(f"{BIG}: {params / 1e6:.1f}M parameters")
    wrapper = export_hf.LogitsOnly(model).eval()
    with atomic_path(path, suffix=".onnx") as tmp:
        spec.path = Path(tmp)
        info = export_hf.export_model(spec, wrapper, Path(tmp), None, False)
    stamp.write_text(json.dumps({"config_sha256": key, "parameters": params, "config": BIG_CONFIG, **info},
                                indent=2))
    return path


# ---- compile -------------------------------------------------------------------------------
def source_digest() -> str:
    """sha256 over polyport's Python sources (tests, benchmarks and examples left out)."""
    h = hashlib.sha256()
    for f in sorted(REPO.rglob("*.py")):
        rel = f.relative_to(REPO)
        if rel.parts[0] in ("tests", "benchmarks", "examples"):
            continue
        h.update(str(rel).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def compile_cached(onnx_path: Path, work_dir: Path, log) -> Path:
    from polyport.compiler import compile_model
    from polyport.runtime.artifact import sha256
    art = work_dir / "artifacts" / onnx_path.stem
    stamp = art.with_name(art.name + ".source")
    digest = f"{sha256(onnx_path)} {source_digest()}"
    if (art / "manifest.json").exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return art
    log(f"compiling {onnx_path.name} for cpu")
    t0 = time.perf_counter()
    compile_model(onnx_path, ["cpu"], art, progress=lambda msg: None)
    stamp.write_text(digest + "\n")
    log(f"compiled {onnx_path.name} in {time.perf_counter() - t0:.1f} s")
    return art


# ---- timing --------------------------------------------------------------------------------
def median(xs):
    import numpy as np
    return float(np.median(np.asarray(xs))) * 1e3


def interleaved(run_ort, run_pp, runs: int, warmup: int, gap_s: float, restore,
                budget_s: float = float("inf"), min_runs: int = 3) -> tuple[list, list]:
    """Alternate ORT and polyport runs with `gap_s` between them; return their timed durations.

    Stops early once `budget_s` has passed and each side has `min_runs` timed runs (a 200M MoE model
    at seq 128 takes ONNX Runtime ~30 s a run here)."""
    t_ort, t_pp = [], []
    start_all = time.perf_counter()

    def one(fn, out):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if out is not None:
            out.append(elapsed)
        time.sleep(gap_s)

    def pp(out):
        one(run_pp, out)
        restore()

    for i in range(warmup + runs):
        timed = i >= warmup
        if i >= 1 and time.perf_counter() - start_all > budget_s:     # over budget:
            if not timed:
                continue                 # skip the remaining warm-up (one round always runs)
            if len(t_ort) >= min_runs:
                break                    # enough timed runs
        if i % 2 == 0:
            one(run_ort, t_ort if timed else None)
            pp(t_pp if timed else None)
        else:
            pp(t_pp if timed else None)
            one(run_ort, t_ort if timed else None)
    return t_ort, t_pp


def format_table(rows) -> str:
    header = ["model", "seq", "ORT ms", "polyport ms", "ORT/polyport", "max |diff|"]
    body = [[r["model"], str(r["seq"]), f"{r['ort_ms']:.3f}", f"{r['polyport_ms']:.3f}",
             f"{r['ratio_ort_over_polyport']:.2f}x", f"{r['max_abs_diff']:.2e}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)     # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="cache for the exported model and the artifacts")
    ap.add_argument("--models", nargs="+", default=list(CORPUS) + [BIG], metavar="NAME",
                    help=f"corpus names ({', '.join(CORPUS)}), {BIG}, or paths to .onnx files")
    ap.add_argument("--no-big", action="store_true", help=f"leave out {BIG}")
    ap.add_argument("--seq", type=int, nargs="+", default=list(DEFAULT_SEQS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=200.0, help="sleep between runs (TVM workers spin ~150 ms)")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="time budget per model and length; past it, stop after 3 timed runs each")
    ap.add_argument("--json", type=Path, default=None, help="default: WORK_DIR/side_by_side.json")
    ap.add_argument("--export-only", action="store_true", help=f"only export {BIG} into the work dir")
    args = ap.parse_args(argv)
    log = lambda msg: print(f"side_by_side: {msg}", file=sys.stderr, flush=True)    # noqa: E731
    args.work_dir.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models if not (args.no_big and m == BIG)]

    if args.export_only:
        export_big(args.work_dir, log)
        return 0
    try:
        cpu_target_available()
    except Missing as e:
        print(f"side_by_side: error: {e}", file=sys.stderr)
        return 2
    from polyport.runtime.cpu_session import usable_cpus
    cpus = usable_cpus()                                          # both ORT and TVM get the CPUs we may use
    os.environ.setdefault("TVM_NUM_THREADS", str(cpus))         # TVM's default is half the cores

    # 1. ONNX files (exporting the big model needs torch; done before any runtime starts)
    paths = {}
    for m in models:
        if m == BIG:
            paths[m] = export_big(args.work_dir, log)
        elif m in CORPUS:
            paths[m] = EXAMPLES / "models" / f"{m}.onnx"
        else:
            paths[Path(m).stem] = Path(m)
    for name, p in paths.items():
        if not p.exists():
            print(f"side_by_side: error: {name}: no such file {p}", file=sys.stderr)
            return 2

    # 2. ONNX Runtime sessions FIRST: nothing has touched TVM yet, so ORT's pool is not pinned to CPU 0.
    import numpy as np
    import onnxruntime as ort
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def restore():
        if affinity is not None:
            os.sched_setaffinity(0, affinity)

    ort_sessions = {}
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = cpus
        ort_sessions[name] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    # 3. compile (cached) and load polyport cpu sessions
    import polyport
    from polyport.runtime.bench import machine_info, make_feeds, write_json
    from polyport.runtime.session import load, signature_types
    pp_sessions = {}
    for name, p in paths.items():
        art = compile_cached(p, args.work_dir, log)
        restore()
        pp_sessions[name] = load(art, "cpu")
        restore()

    # 4. interleaved timing
    rows = []
    for name in paths:
        o, s = ort_sessions[name], pp_sessions[name]
        specs = signature_types(s.signature["inputs"])
        out_name = o.get_outputs()[0].name
        for seq in args.seq:
            feeds = make_feeds(specs, seq)
            ort_feeds = {i.name: feeds[i.name] for i in o.get_inputs()}
            want = o.run([out_name], ort_feeds)[0]
            got = s.run(feeds)
            restore()
            got = got[out_name] if out_name in got else next(iter(got.values()))
            diff = float(np.max(np.abs(np.asarray(got, np.float64) - want))) if np.shape(got) == want.shape \
                else float("inf")
            log(f"timing {name} seq {seq}")
            t_ort, t_pp = interleaved(lambda: o.run([out_name], ort_feeds), lambda: s.run(feeds),
                                      args.runs, args.warmup, args.gap_ms / 1e3, restore, args.budget_s)
            ort_ms, pp_ms = median(t_ort), median(t_pp)
            rows.append({"model": name, "seq": seq, "ort_ms": ort_ms, "polyport_ms": pp_ms,
                         "ratio_ort_over_polyport": ort_ms / pp_ms, "runs": len(t_ort), "max_abs_diff": diff})
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)

    print()
    print(format_table(rows))
    doc = {"benchmark": "side_by_side", "machine": machine_info(), "polyport": polyport.__version__,
           "onnxruntime": ort.__version__,
           "settings": {"runs": args.runs, "warmup": args.warmup, "gap_ms": args.gap_ms, "budget_s": args.budget_s,
                        "threads": cpus,
                        "ort": "CPUExecutionProvider, ORT_ENABLE_ALL", "statistic": "median",
                        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS")},
           "rows": rows}
    out = args.json or args.work_dir / "side_by_side.json"
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

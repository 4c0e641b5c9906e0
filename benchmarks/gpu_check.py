#!/usr/bin/env python
"""polyport's cuda target on a real NVIDIA GPU: compile, run, check numerics, time against ONNX Runtime.

    python benchmarks/gpu_check.py --work-dir DIR [--models NAME|PATH ...] [--seq 1 16 128 1024]
                                   [--runs 20] [--warmup 3] [--budget-s S] [--quick] [--arch sm_90]
                                   [--target cuda|cpu] [--compile-only] [--json FILE]
                                   [--gen-tokens 16] [--gen-prompt 8] [--dtype f32|bf16|f16]

(benchmarks/gpu_check.sh wraps it: offline wheel install, library paths;
benchmarks/gpu_bundle.sh compiles here and packs what a GPU machine that
cannot take the full TVM needs.) Run from the repository root. Nothing is
downloaded: what is missing is reported.

1. Environment: TVM (and whether its CUDA runtime loads), the GPU and its
   arch, nvcc, onnxruntime and whether its CUDA execution provider works
   (onnxruntime-gpu). Without TVM, onnxruntime or polyport's cuda target it
   stops here (exit 2).
2. Compile each model with `python -m polyport.cli compile M --target cuda
   --arch <the GPU's arch> --dtype D` into DIR/artifacts (`M.cuda`, `M.cuda.bf16`, ...), unless DIR/artifacts already
   holds a build of that very ONNX file with code for the GPU's arch (each
   compile gets the budget left). --compile-only stops here (no GPU needed);
   without a usable GPU it stops here with a clear message (exit 2).
3. For each model and --seq: the same deterministic inputs as `polyport bench`
   go to polyport (session.run, which returns host arrays: every timed run
   includes uploads, the kernels and the download) and to ONNX Runtime. Logits
   are compared with ORT's CPU EP on the original export:
       max |polyport - ort| <= tol * max |ort|,  tol = 1e-3 (f32), 2e-2 (f16), 6.25e-2 (bf16)
   by the artifact's compute dtype (--dtype bf16 | f16: the cuda target computes
   its activations and KV caches in that dtype, accumulating in f32; they round
   every layer's activations: 2^-11 and 2^-8 unit roundoff, accumulated over a
   few layers).
4. Timing: polyport and the peer interleaved (`interleaved` below),
   median of --runs after --warmup. The peer is ORT's CUDA EP when it works,
   else ORT's CPU EP, and the table says which.

5. Generation (--gen-tokens N, default 16; 0 skips it): greedy `generate` of N
   tokens after a --gen-prompt-token prompt on the target. Its tokens must equal
   the cpu target's (the artifact is compiled for the cpu target too; with
   --target cpu, ORT's greedy loop is the reference, except after a step whose
   top-1/top-2 margin is below 1e-5 x max |logit|). With --dtype bf16 | f16 the
   cpu target (f32 activations) cannot share the artifact: ORT's greedy loop is
   the reference, and the tokens may part after a step whose margin is below the
   dtype's tolerance (a 16-bit forward may pick either token there). Time per output token:
   polyport decodes through its KV cache where the artifact has the derived
   programs (else it recomputes, and the row says so); the peer (ORT's CUDA EP,
   else CPU EP) runs the cache-less export, a full forward over the whole
   sequence per token, since that is the export users have. The table says so.

6. Batched decode (--gen-batch N, default 8; 1 skips it): N prompts of different
   lengths (right-padded) decode together for --gen-tokens steps, each step fed the
   batch's greedy picks; then each sequence decodes alone on the same target, fed
   the same tokens. Every step's logits must agree within the dtype's tolerance
   (batched programs: one cache for the batch; batch-1 programs: one per sequence).
   Also times a decode step of the batch against one of a sequence alone.

--quick (or --budget-s S): 5 runs after 2 warm-ups and a total budget (420 s
with --quick) shared by compiles and timing; past the budget a row keeps its
numerics check and is timed only 3 times; compiles may use all of the
budget but the last quarter (kept for the runs), and a compile that runs past
that is stopped. --target cpu runs the same steps on polyport's cpu target (no
GPU needed): a check of this script's plumbing.

Prints a table and writes JSON (--json, default DIR/gpu_check.json). Exit 0 when
every row is within tolerance, 1 on a numerics, compile or run failure, 2 when
the environment cannot run the check.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import CORPUS, EXAMPLES  # noqa: E402

DEFAULT_SEQS = (1, 16, 128, 1024)
# x max |ORT CPU logit|; f16 / bf16 as passes/region.py's tolerance() (README: the tolerance table)
TOLERANCES = {"f32": 1e-3, "f16": 2e-2, "bf16": 6.25e-2}
QUICK = {"runs": 5, "warmup": 2, "budget_s": 420.0}
RUN_SHARE = 0.25          # of --budget-s, kept from the compiles for the numerics checks and timing


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


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def log(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


class Budget:
    """Seconds left of --budget-s (infinite without it)."""

    def __init__(self, seconds: Optional[float]):
        self.total = seconds or float("inf")
        self.end = time.perf_counter() + self.total

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left, less `reserve` (a share of the total kept for later steps)."""
        return self.end - time.perf_counter() - reserve * self.total if self.total != float("inf") else self.total


# ---- 1. environment -----------------------------------------------------------------------
def environment(target: str) -> tuple[dict[str, Any], list[str], Optional[str]]:
    """(facts, blocking problems, why the device cannot run or None)."""
    env: dict[str, Any] = {"python": sys.version.split()[0]}
    blocking: list[str] = []
    try:
        import polyport
        env["polyport"] = f"{polyport.__version__} ({Path(polyport.__file__).resolve().parent})"
    except Exception as e:  # noqa: BLE001 - report any import failure, do not hide it
        return {**env, "polyport": f"not importable: {e}"}, [f"polyport is not importable ({e}); run from the "
                                                              "repository root or install it"], None
    try:       # the compiler side; a runtime-only TVM may lack it, and a run of cached artifacts needs none
        from polyport.targets.base import target_names
        env["polyport_targets"] = target_names()
    except Exception as e:  # noqa: BLE001
        env["polyport_targets"] = []
        env["polyport_compiler"] = f"not importable: {type(e).__name__}: {e}"
    try:
        import tvm
        runtime_only = getattr(tvm.base, "_RUNTIME_ONLY", False)
        env["tvm"] = f"{tvm.__version__} ({Path(tvm.__file__).parent}{', runtime only' if runtime_only else ''})"
    except ImportError as e:
        blocking.append(f"apache-tvm is not installed ({e}); see gpu_check.sh (WHEELS=DIR, or a bundle)")
    try:
        import onnxruntime as ort
        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError as e:
        blocking.append(f"onnxruntime is not installed ({e}): it is the numerics reference")
    nvcc = shutil.which("nvcc")
    env["nvcc"] = _first_output([nvcc, "--version"], last=True) if nvcc else "not on PATH"
    env["nvidia_smi"] = _first_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                       "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "not on PATH"
    device_problem = None
    if target != "cpu" and "tvm" in env:
        from polyport.runtime import gpu_session
        device_problem = gpu_session.device_problem(target)
        if device_problem is None:
            _, env["device"], env["device_arch"] = gpu_session.open_device(target)
        else:
            env["device"] = device_problem
    return env, blocking, device_problem


def _first_output(cmd: list[str], last: bool = False) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed: {e}"
    return (out[-1] if last else out[0]) if out else "no output"


def ort_sessions(path: Path, cuda_ep: bool) -> tuple[Any, Any, str]:
    """(CPU EP session, CUDA EP session or None, why the CUDA EP is absent: '' when present)."""
    import onnxruntime as ort
    from polyport.devices import usable_cpus
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = usable_cpus()
    cpu = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if not cuda_ep:
        return cpu, None, ""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return cpu, None, f"onnxruntime {ort.__version__} has no CUDA EP (onnxruntime-gpu is not installed)"
    try:
        gpu = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a missing cuDNN / CUDA library surfaces here
        return cpu, None, f"ORT's CUDA EP failed to start: {str(e).strip().splitlines()[0]}"
    if gpu.get_providers()[0] != "CUDAExecutionProvider":
        return cpu, None, f"ORT fell back to {gpu.get_providers()[0]} (its CUDA libraries did not load)"
    return cpu, gpu, ""


# ---- 2. compile ---------------------------------------------------------------------------
def artifact_dir(onnx_path: Path, work_dir: Path, target: str, dtype: str = "f32") -> Path:
    return work_dir / "artifacts" / f"{onnx_path.stem}.{target}{'' if dtype == 'f32' else '.' + dtype}"


def build_targets(target: str, generation: bool, dtype: str = "f32") -> list[str]:
    """The targets compiled: the checked one, plus cpu when the generation check needs its tokens (in f32 only:
    a 16-bit cuda graph and the cpu target's f32 one cannot share an artifact)."""
    return [target] + (["cpu"] if generation and target != "cpu" and dtype == "f32" else [])


def cached_artifact(onnx_path: Path, work_dir: Path, target: str, archs: list[str],
                    targets: Optional[list[str]] = None, dtype: str = "f32") -> Optional[Path]:
    """The artifact compiled earlier from this very ONNX file, if it holds code for every arch in `archs`
    (as the loader would pick it: an sm_80 build serves an sm_86 device)."""
    from polyport.errors import PolyportError
    from polyport.runtime.artifact import Artifact, sha256
    from polyport.runtime.gpu_session import select_arch
    art = artifact_dir(onnx_path, work_dir, target, dtype)
    stamp = art.with_name(art.name + ".source")
    if not (art / "manifest.json").exists() or not stamp.exists() or \
            stamp.read_text().strip() != f"{sha256(onnx_path)} {target}":
        return None
    if not set(targets or [target]) <= set(Artifact(art).targets):
        return None
    if target in ("cuda", "rocm"):
        try:
            built = Artifact(art).target_entry(target).get("archs", [])
            for a in archs:
                select_arch(target, built, a)
        except PolyportError:
            return None
    return art


def compile_cli(onnx_path: Path, work_dir: Path, target: str, archs: list[str], timeout_s: float,
                targets: Optional[list[str]] = None, dtype: str = "f32") -> float:
    """`polyport compile` in a subprocess (a hung compile cannot eat the budget); returns its seconds.
    `targets` (default [target]): every target built into the artifact named after `target`."""
    from polyport.runtime.artifact import sha256
    art = artifact_dir(onnx_path, work_dir, target, dtype)
    art.parent.mkdir(parents=True, exist_ok=True)       # compile writes into an existing folder only
    cmd = [sys.executable, "-m", "polyport.cli", "compile", str(onnx_path), "-o", str(art), "--dtype", dtype]
    for t in targets or [target]:
        cmd += ["--target", t]
    for a in archs:
        cmd += ["--arch", a]
    log(f"compiling {onnx_path.name} for {' + '.join(targets or [target])} {' '.join(archs)} ({dtype})")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=None if timeout_s == float("inf") else max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"compile of {onnx_path.name} ran past the budget ({timeout_s:.0f} s)") from None
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
        raise RuntimeError(f"compile of {onnx_path.name} failed: {tail}")
    art.with_name(art.name + ".source").write_text(f"{sha256(onnx_path)} {target}\n")
    return time.perf_counter() - t0


# ---- 3./4. numerics and timing ------------------------------------------------------------
def relative_error(got, want) -> tuple[float, float]:
    """(max |got - want|, max |want|); inf when the shapes differ."""
    import numpy as np
    want = np.asarray(want, np.float64)
    if np.shape(got) != want.shape:
        return float("inf"), float(np.abs(want).max())
    return float(np.abs(np.asarray(got, np.float64) - want).max()), float(np.abs(want).max())


def compute_dtype(art: Path, target: str) -> str:
    """The dtype setting the tolerance: the target's compute dtype, or its weights' where only they are 16-bit
    (the cpu target with --dtype bf16 | f16)."""
    from polyport.runtime.artifact import Artifact
    a = Artifact(art)
    dtype = str(a.target_entry(target).get("dtype") or (a.manifest.get("cost") or {}).get("dtype") or "f32")
    weights = (a.manifest.get("quantization") or {}).get("scheme")
    return weights if dtype == "f32" and weights in TOLERANCES else dtype


def check_model(name: str, art: Path, target: str, ort_cpu, ort_gpu, peer_note: str,
                args, budget: Budget, rows_left: int, restore) -> list[dict[str, Any]]:
    import polyport
    from polyport.runtime.bench import make_feeds
    from polyport.runtime.session import signature_types
    session = polyport.load(art, target)
    restore()
    dtype = compute_dtype(art, target)
    tol = TOLERANCES.get(dtype, TOLERANCES["f32"])
    specs = signature_types(session.signature["inputs"])
    out_name = ort_cpu.get_outputs()[0].name
    peer, peer_name = (ort_gpu, "ORT CUDA EP") if ort_gpu is not None else (ort_cpu, "ORT CPU EP")
    rows = []
    for seq in args.seq:
        feeds = make_feeds(specs, seq)
        ort_feeds = {i.name: feeds[i.name] for i in ort_cpu.get_inputs()}
        want = ort_cpu.run([out_name], ort_feeds)[0]
        got = session.run(feeds)
        restore()
        got = got[out_name] if out_name in got else next(iter(got.values()))
        diff, scale = relative_error(got, want)
        row = {"model": name, "seq": seq, "dtype": dtype, "device": getattr(session, "device_name", target),
               "arch": getattr(session, "arch", None), "max_abs_diff": diff, "max_abs_ort": scale,
               "tolerance": tol, "ok": diff <= tol * scale, "peer": peer_name, "peer_note": peer_note}
        share = budget.left() / max(rows_left, 1)
        rows_left -= 1
        t_peer, t_pp = interleaved(lambda: peer.run([out_name], ort_feeds), lambda: session.run(feeds),
                                   args.runs, args.warmup, args.gap_ms / 1e3, restore, budget_s=max(share, 0.0))
        row.update(polyport_ms=median(t_pp), peer_ms=median(t_peer), runs=len(t_pp))
        row["peer_over_polyport"] = row["peer_ms"] / row["polyport_ms"]
        rows.append(row)
        log(f"{name} seq {seq}: rel err {diff / scale if scale else diff:.2e} (tol {tol:g}) "
            f"{'ok' if row['ok'] else 'FAIL'}; polyport {row['polyport_ms']:.3f} ms, {peer_name} "
            f"{row['peer_ms']:.3f} ms")
    return rows


NEAR_TIE = 1e-5           # x max |logit|: a greedy step this close may pick either token (issue 11)


def prompt_ids(vocab: int, n: int):
    import numpy as np
    return np.random.default_rng(n).integers(0, max(vocab, 1), size=(1, n), dtype=np.int64)


def ort_greedy(ort_session, ids, n_new: int, restore=lambda: None) -> tuple[list[int], list[float], list[float]]:
    """ONNX Runtime's greedy loop on a cache-less export: a full forward over the whole sequence per token.
    (tokens, the top-1/top-2 margin of each step relative to max |logit|, each step's seconds)."""
    import numpy as np
    name = ort_session.get_inputs()[0].name
    seq = [int(t) for t in np.asarray(ids).reshape(-1)]
    tokens, margins, times = [], [], []
    for _ in range(n_new):
        t0 = time.perf_counter()
        logits = ort_session.run(None, {name: np.asarray([seq], np.int64)})[0][0, -1]
        times.append(time.perf_counter() - t0)
        restore()
        top2 = np.sort(logits)[-2:] if logits.size > 1 else np.array([0.0, logits[0]])
        margins.append(float(top2[1] - top2[0]) / max(float(np.abs(logits).max()), 1e-30))
        tokens.append(int(np.argmax(logits)))
        seq.append(tokens[-1])
    return tokens, margins, times


def tokens_agree(got: list[int], want: list[int], margins: list[float], near_tie: float = NEAR_TIE) -> bool:
    """Equal, or equal up to the first step whose margin is a near tie (after it the sequences may part)."""
    for t, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return any(m < near_tie for m in margins[:t + 1])
    return len(got) == len(want)


def timed_generation(session, ids, n_new: int, restore=lambda: None) -> tuple[list[int], float, list[float], bool]:
    """Greedy tokens through the session's generation state: (tokens, ttft seconds, each append's seconds,
    whether it decoded through the KV cache rather than recomputing)."""
    import numpy as np
    from polyport.runtime.generation import generator_for
    gen = generator_for(session, getattr(session, "generation", None))
    t0 = time.perf_counter()
    state = gen.start(ids, max_length=ids.shape[1] + n_new)
    ttft = time.perf_counter() - t0
    restore()
    tokens, steps = [], []
    logits = state.logits
    for t in range(n_new):
        tokens.append(int(np.argmax(logits[0])))
        if t + 1 < n_new:
            t0 = time.perf_counter()
            logits = state.append(np.asarray([tokens[-1]], np.int64))
            steps.append(time.perf_counter() - t0)
            restore()
    return tokens, ttft, steps, state.cached


def check_generation(name: str, art: Path, target: str, ort_cpu, ort_gpu, args, restore) -> dict[str, Any]:
    """One generation row: greedy tokens against the reference, time per output token against the peer."""
    import polyport
    from polyport.runtime.artifact import Artifact
    gen_info = Artifact(art).manifest.get("generation") or {}
    session = polyport.load(art, target)
    restore()
    ids = prompt_ids(int(gen_info.get("vocab") or 2), args.gen_prompt)
    tokens, ttft, steps, cached = timed_generation(session, ids, args.gen_tokens, restore)
    ort_tokens, margins, peer_steps = ort_greedy(ort_cpu, ids, args.gen_tokens, restore)
    peer_name = "ORT CPU EP"
    if ort_gpu is not None:
        peer_name, peer_steps = "ORT CUDA EP", ort_greedy(ort_gpu, ids, args.gen_tokens, restore)[2]
    row = {"model": name, "device": getattr(session, "device_name", target),
           "arch": getattr(session, "arch", None), "prompt": args.gen_prompt, "new_tokens": args.gen_tokens,
           "tokens": tokens, "ort_tokens": ort_tokens, "tokens_agree_ort": tokens_agree(tokens, ort_tokens, margins),
           "decode": "kv cache" if cached else "recompute",
           "ttft_ms": ttft * 1e3, "tpot_ms": median(steps) if steps else None, "peer": peer_name,
           "peer_export": "cache-less (full forward over the sequence per token)",
           "peer_tpot_ms": median(peer_steps[1:] or peer_steps)}     # the first step warms up
    dtype = compute_dtype(art, target)
    if target != "cpu" and "cpu" in Artifact(art).targets:
        row["cpu_tokens"] = timed_generation(polyport.load(art, "cpu"), ids, args.gen_tokens, restore)[0]
        row["ok"] = tokens_agree(tokens, row["cpu_tokens"], margins)
    else:      # the cpu target, or a 16-bit target: ORT's greedy loop, parting allowed at a tie within the tolerance
        row["reference"] = "ORT greedy loop"
        row["ok"] = tokens_agree(tokens, ort_tokens, margins, NEAR_TIE if dtype == "f32" else TOLERANCES[dtype])
    log(f"{name} generation: {args.gen_tokens} tokens {'ok' if row['ok'] else 'DIFFER'} "
        f"({row['decode']}); polyport {row['tpot_ms'] or 0:.3f} ms/token, {peer_name} (cache-less) "
        f"{row['peer_tpot_ms']:.3f} ms/token")
    return row


def batch_prompt_lengths(prompt: int, batch: int) -> list[int]:
    """Right-padded prompts of different lengths: prompt, prompt - 2, ... (at least 1), repeating every 4."""
    return [max(1, prompt - 2 * (b % 4)) for b in range(batch)]


def check_batched_generation(name: str, art: Path, target: str, args, restore) -> dict[str, Any]:
    """A batch of --gen-batch prompts of different lengths decoded together, against each sequence decoded
    alone on the same target and fed the same tokens (the batch's greedy picks): the logits of every step
    must agree within the dtype's tolerance. Also times a decode step of the batch against batch 1."""
    import numpy as np
    import polyport
    from polyport.runtime.artifact import Artifact
    from polyport.runtime.generation import generator_for
    info = Artifact(art).manifest.get("generation") or {}
    session = polyport.load(art, target)
    restore()
    gen = generator_for(session, getattr(session, "generation", None))
    n, steps = args.gen_batch, max(args.gen_tokens, 2)
    lens = np.asarray(batch_prompt_lengths(args.gen_prompt, n), np.int64)
    ids = prompt_ids(int(info.get("vocab") or 2), int(lens.max()) * n).reshape(n, -1)
    cap = int(lens.max()) + steps
    state = gen.start(ids, lengths=lens, max_length=cap)
    restore()
    batched, picks, times = [state.logits.copy()], [], []
    for _ in range(steps - 1):
        picks.append(np.argmax(batched[-1], axis=-1).astype(np.int64))
        t0 = time.perf_counter()
        batched.append(state.append(picks[-1]).copy())
        times.append(time.perf_counter() - t0)
        restore()
    err, scale, alone_times = 0.0, 0.0, []
    for b in range(n):
        one = gen.start(ids[b:b + 1, :lens[b]], max_length=cap)
        restore()
        alone = [one.logits[0].copy()]
        for pick in picks:
            t0 = time.perf_counter()
            alone.append(one.append(pick[b:b + 1])[0].copy())
            alone_times.append(time.perf_counter() - t0)
            restore()
        d, m = relative_error(np.stack([x[b] for x in batched]), np.stack(alone))
        err, scale = max(err, d), max(scale, m)
    tol = TOLERANCES.get(compute_dtype(art, target), TOLERANCES["f32"])
    programs = ("none (recompute)" if not state.cached else "batched" if info.get("batch") is None
                else f"per sequence ({info.get('per_sequence') or 'batch 1'})")
    row = {"model": name, "batch": n, "prompt_lengths": lens.tolist(), "steps": steps, "programs": programs,
           "max_abs_diff": err, "max_abs_alone": scale,
           "tolerance": tol, "ok": err <= tol * scale, "tpot_batch_ms": median(times), "tpot_alone_ms": median(alone_times)}
    row["throughput_over_batch1"] = n * row["tpot_alone_ms"] / row["tpot_batch_ms"]
    log(f"{name} batch {n} ({programs}): rel err {err / scale if scale else err:.2e} against each alone "
        f"{'ok' if row['ok'] else 'FAIL'}; step {row['tpot_batch_ms']:.3f} ms, alone {row['tpot_alone_ms']:.3f} ms "
        f"({row['throughput_over_batch1']:.2f}x the tokens/s)")
    return row


def format_batch_table(rows: list[dict[str, Any]]) -> str:
    from polyport.runtime.bench import text_table
    header = ["model", "batch", "programs", "rel err", "tol", "ok", "step ms", "alone step ms", "tokens/s vs batch 1"]
    body = [[r["model"], str(r["batch"]), r["programs"],
             f"{r['max_abs_diff'] / r['max_abs_alone']:.2e}" if r["max_abs_alone"] else f"{r['max_abs_diff']:.2e}",
             f"{r['tolerance']:g}", "ok" if r["ok"] else "FAIL", f"{r['tpot_batch_ms']:.3f}",
             f"{r['tpot_alone_ms']:.3f}", f"{r['throughput_over_batch1']:.2f}x"] for r in rows]
    return "\n".join(text_table(header, body, right=(1, 3, 4, 6, 7, 8)))


def format_generation_table(rows: list[dict[str, Any]]) -> str:
    from polyport.runtime.bench import text_table
    header = ["model", "prompt", "tokens", "equal", "decode", "ttft ms", "tpot ms", "peer (cache-less export)",
              "peer tpot ms", "peer/polyport"]
    body = [[r["model"], str(r["prompt"]), str(r["new_tokens"]), "ok" if r["ok"] else "DIFFER", r["decode"],
             f"{r['ttft_ms']:.3f}", f"{r['tpot_ms']:.3f}" if r["tpot_ms"] else "-", r["peer"],
             f"{r['peer_tpot_ms']:.3f}", f"{r['peer_tpot_ms'] / r['tpot_ms']:.2f}x" if r["tpot_ms"] else "-"]
            for r in rows]
    return "\n".join(text_table(header, body, right=(1, 2, 5, 6, 8, 9)))


def format_table(rows: list[dict[str, Any]]) -> str:
    from polyport.runtime.bench import text_table
    header = ["model", "seq", "dtype", "rel err", "tol", "ok", "polyport ms", "peer", "peer ms", "peer/polyport"]
    body = [[r["model"], str(r["seq"]), r["dtype"],
             f"{r['max_abs_diff'] / r['max_abs_ort']:.2e}" if r["max_abs_ort"] else f"{r['max_abs_diff']:.2e}",
             f"{r['tolerance']:g}", "ok" if r["ok"] else "FAIL", f"{r['polyport_ms']:.3f}", r["peer"],
             f"{r['peer_ms']:.3f}", f"{r['peer_over_polyport']:.2f}x"] for r in rows]
    return "\n".join(text_table(header, body, right=(1, 3, 4, 6, 8, 9)))


# ---- main ---------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, required=True, help="artifacts and the JSON go here")
    ap.add_argument("--models", nargs="+", default=list(CORPUS), metavar="NAME|PATH",
                    help=f"corpus names ({', '.join(CORPUS)}) or .onnx paths")
    ap.add_argument("--seq", type=int, nargs="+", default=list(DEFAULT_SEQS))
    ap.add_argument("--runs", type=int, default=None, help="timed runs per row (20; 5 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (3; 2 with --quick)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="total seconds for compiles and timing (420 with --quick; default: none)")
    ap.add_argument("--quick", action="store_true", help="fewer runs and a budget: one run fits in ~8 minutes")
    ap.add_argument("--arch", action="append", default=None, metavar="SM",
                    help="architectures to compile for (default: the GPU's own, else the target's defaults)")
    ap.add_argument("--target", default="cuda", choices=("cuda", "cpu"),
                    help="cuda; cpu runs every step on polyport's cpu target (no GPU): a plumbing check")
    ap.add_argument("--gap-ms", type=float, default=None,
                    help="sleep between timed runs (default 0 on GPU; 200 on cpu, where TVM's workers spin)")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile (no GPU needed) and stop: a later run on the GPU machine finds the artifacts")
    ap.add_argument("--gen-tokens", type=int, default=16,
                    help="the generation check's greedy tokens per model (0: no generation check)")
    ap.add_argument("--gen-prompt", type=int, default=8, help="the generation check's prompt length")
    ap.add_argument("--gen-batch", type=int, default=8,
                    help="prompts of different lengths decoded as one batch, each checked against itself alone "
                         "(1: no batch check)")
    ap.add_argument("--dtype", default="f32", choices=("f32", "bf16", "f16"),
                    help="compile --dtype: cuda computes activations and KV caches in bf16 / f16 (f32 accumulation); "
                         "its tolerance follows")
    ap.add_argument("--json", type=Path, default=None, help="default: WORK_DIR/gpu_check.json")
    args = ap.parse_args(argv)
    quick = QUICK if args.quick else {"runs": 20, "warmup": 3, "budget_s": None}
    args.runs = args.runs if args.runs is not None else quick["runs"]
    args.warmup = args.warmup if args.warmup is not None else quick["warmup"]
    args.budget_s = args.budget_s if args.budget_s is not None else quick["budget_s"]
    args.gap_ms = args.gap_ms if args.gap_ms is not None else (200.0 if args.target == "cpu" else 0.0)
    if args.runs < 1 or args.warmup < 0 or any(s < 1 for s in args.seq):
        ap.error("--runs must be >= 1, --warmup >= 0 and every --seq >= 1")
    if args.gen_tokens < 0 or args.gen_prompt < 1 or args.gen_batch < 1:
        ap.error("--gen-tokens must be >= 0, --gen-prompt >= 1 and --gen-batch >= 1")
    return args


def model_paths(names: list[str]) -> dict[str, Path]:
    out = {}
    for m in names:
        p = EXAMPLES / "models" / f"{m}.onnx" if m in CORPUS else Path(m)
        out[p.stem if m not in CORPUS else m] = p
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.json or args.work_dir / "gpu_check.json"
    budget = Budget(args.budget_s)
    doc: dict[str, Any] = {"benchmark": "gpu_check", "target": args.target,
                           "settings": {"seqs": args.seq, "runs": args.runs, "warmup": args.warmup,
                                        "budget_s": args.budget_s, "gap_ms": args.gap_ms,
                                        "statistic": "median", "tolerances": TOLERANCES, "dtype": args.dtype},
                           "compiles": {}, "rows": [], "generation": [], "batch": [], "failures": []}

    def finish(code: int, message: str = "") -> int:
        if message:
            print(f"gpu_check: {'error: ' if code else ''}{message}", file=sys.stderr)
            doc["stopped"] = message
        doc["exit_code"] = code
        try:
            from polyport.runtime.bench import write_json
            write_json(out_json, doc)
            print(f"wrote {out_json}")
        except Exception as e:  # noqa: BLE001 - polyport itself may be what is missing
            print(f"gpu_check: could not write {out_json}: {e}", file=sys.stderr)
        return code

    env, blocking, device_problem = environment(args.target)
    doc["environment"] = env
    for k, v in env.items():
        print(f"  {k:<22} {v}")
    if blocking:
        return finish(2, "cannot run the check: " + "; ".join(blocking))
    from polyport.runtime.bench import machine_info
    doc["machine"] = machine_info()

    paths = model_paths(args.models)
    missing = [f"{n} ({p})" for n, p in paths.items() if not p.is_file()]
    if missing:
        return finish(2, f"no such model file: {', '.join(missing)}")

    archs = args.arch or ([env["device_arch"]] if env.get("device_arch") else [])
    targets = build_targets(args.target, args.gen_tokens > 0, args.dtype)
    arts = {n: a for n, p in paths.items()
            if (a := cached_artifact(p, args.work_dir, args.target, archs, targets, args.dtype))}
    uncached = [n for n in paths if n not in arts]
    if uncached and (args.target not in env["polyport_targets"] or "runtime only" in env["tvm"]):
        why = ("this TVM is runtime-only (no compiler library)" if "runtime only" in env["tvm"] else
               f"polyport's compiler is {env['polyport_compiler']}" if "polyport_compiler" in env else
               f"polyport has no {args.target!r} target (registered: {', '.join(env['polyport_targets'])}; "
               f"targets/{args.target}.py is missing from this checkout)")
        return finish(2, f"cannot compile {', '.join(uncached)}: {why}, and {args.work_dir / 'artifacts'} "
                         "holds no build of them (benchmarks/gpu_bundle.sh makes one)")

    # ORT sessions FIRST, before anything runs TVM (TVM pins the calling thread to CPU 0; TVM_NOTES.md).
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def restore():
        if affinity is not None:
            os.sched_setaffinity(0, affinity)

    sessions = {}
    for name, p in ({} if args.compile_only else paths).items():
        try:
            sessions[name] = ort_sessions(p, cuda_ep=args.target == "cuda")
        except Exception as e:  # noqa: BLE001 - ORT rejects the file: no reference, so no check of this model
            doc["failures"].append(f"{name}: ONNX Runtime cannot load {p}: {str(e).strip().splitlines()[0]}")
            log(doc["failures"][-1])
    paths = {n: p for n, p in paths.items() if n in sessions or args.compile_only}
    doc["ort_cuda_ep"] = "not checked (--compile-only)" if args.compile_only else \
        next((note for _, _, note in sessions.values() if note), "") or \
        ("available" if args.target == "cuda" else "not used (--target cpu)")

    for name, p in paths.items():
        if name in arts:
            doc["compiles"][name] = {"status": "cached", "artifact": str(arts[name])}
            continue
        compile_s = budget.left(reserve=RUN_SHARE)     # compiles leave RUN_SHARE of the budget to the runs
        if compile_s <= 0:
            doc["compiles"][name] = {"status": "skipped: budget spent"}
            doc["failures"].append(f"{name}: not compiled (budget spent)")
            continue
        try:
            secs = compile_cli(p, args.work_dir, args.target, archs, compile_s, targets, args.dtype)
            arts[name] = artifact_dir(p, args.work_dir, args.target, args.dtype)
            doc["compiles"][name] = {"status": "ok", "seconds": round(secs, 1), "artifact": str(arts[name])}
        except RuntimeError as e:
            doc["compiles"][name] = {"status": str(e)}
            doc["failures"].append(str(e))
            log(str(e))
    done = f"compiled for {args.target}: {', '.join(arts) or 'none'} in {args.work_dir / 'artifacts'}"
    if args.compile_only:
        return finish(1 if doc["failures"] else 0, f"{done} (--compile-only)")
    if device_problem is not None:
        return finish(2, f"{done}; stopping before the run: target {args.target}: {device_problem}")

    rows_left = len(arts) * len(args.seq)
    for name, art in arts.items():
        ort_cpu, ort_gpu, note = sessions[name]
        try:
            rows = check_model(name, art, args.target, ort_cpu, ort_gpu, note, args, budget,
                               rows_left, restore)
        except Exception as e:  # noqa: BLE001 - one model failing must not hide the others' results
            doc["failures"].append(f"{name}: run failed: {first_line(e)}")
            log(doc["failures"][-1])
            rows = []
        rows_left -= len(args.seq)
        if args.gen_tokens:
            try:
                doc["generation"].append(check_generation(name, art, args.target, ort_cpu, ort_gpu, args, restore))
                if not doc["generation"][-1]["ok"]:
                    doc["failures"].append(f"{name}: greedy tokens differ from the "
                                           f"{doc['generation'][-1].get('reference', 'cpu target')}")
            except Exception as e:  # noqa: BLE001
                doc["failures"].append(f"{name}: generation failed: {first_line(e)}")
                log(doc["failures"][-1])
        if args.gen_tokens and args.gen_batch > 1:
            try:
                doc["batch"].append(check_batched_generation(name, art, args.target, args, restore))
                if not doc["batch"][-1]["ok"]:
                    doc["failures"].append(f"{name}: a batch of {args.gen_batch} differs from each sequence alone")
            except Exception as e:  # noqa: BLE001
                doc["failures"].append(f"{name}: batched generation failed: {first_line(e)}")
                log(doc["failures"][-1])
        doc["rows"].extend(rows)
        doc["failures"].extend(f"{r['model']} seq {r['seq']}: max |diff| {r['max_abs_diff']:.3g} > "
                               f"{r['tolerance']:g} x max |ORT| {r['max_abs_ort']:.3g}" for r in rows if not r["ok"])
    print()
    print(format_table(doc["rows"]))
    if doc["generation"]:
        print()
        print("generation: greedy tokens equal to the reference; time per output token against the peer running "
              "the cache-less export (a full forward per token)")
        print(format_generation_table(doc["generation"]))
    if doc["batch"]:
        print()
        print(f"batched decode: {args.gen_batch} prompts of different lengths together, against each alone on the "
              "same target fed the same tokens")
        print(format_batch_table(doc["batch"]))
    if doc["ort_cuda_ep"] not in ("available",) and args.target == "cuda":
        print(f"peer: ORT CPU EP, because {doc['ort_cuda_ep']}")
    for f in doc["failures"]:
        print(f"FAILED: {f}")
    return finish(1 if doc["failures"] else 0)


if __name__ == "__main__":
    sys.exit(main())

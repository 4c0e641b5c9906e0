#!/usr/bin/env python
"""Decode against llama.cpp (F32) on the same weights: time per output token, each engine alone.

    python benchmarks/llama_cpp.py --work-dir /tmp/bench                  # the README's decode table
    python benchmarks/llama_cpp.py --work-dir DIR [--models llama_500m ...] [--contexts 128 1024]
        [--rounds 3] [--tokens 16] [--threads 2] [--no-check] [--outtypes f32 q8_0 q4_0]
    python benchmarks/llama_cpp.py --build-only                           # llama-bench, libllama

llama.cpp comes from the PyPI sdist of llama-cpp-python (pinned: LLAMA_CPP_PYTHON), which vendors
it: `pip download` fetches the sdist once into the cache dir ($POLYPORT_LLAMA_CPP, default
~/.cache/polyport/llama.cpp), and cmake builds llama-bench, llama-quantize and the shared
libllama there (Release, GGML_NATIVE, 2 jobs). Then, per model of benchmarks/big_model.py:
1. the model is built and exported once (NAME.onnx and the Hugging Face checkpoint NAME.hf/);
2. llama.cpp's convert_hf_to_gguf.py writes NAME.f32.gguf (and, with --outtypes, q8_0 directly
   and q4_0 through llama-quantize, for the quantization benchmarks);
3. llama.cpp's F32 logits (llama-cpp-python's ctypes bindings over the libllama built here, every
   position of one prompt) are checked against PyTorch's before anything is timed;
4. polyport compiles NAME.onnx for the cpu target (cached, benchmarks/engines.py);
5. rounds alternate three children, each alone: a STREAM triad (this machine's bandwidth now),
   polyport's decode (engines.py's `decode` child: `append` one token at each context) and
   `llama-bench -p 0 -n TOKENS -d CONTEXT` (token generation after CONTEXT tokens of depth).
Reported per context: each engine's time per output token (median over rounds of each child's
median; min..max), the ratio llama.cpp ms / polyport ms per round (above 1: polyport faster), and
polyport's fraction of the bandwidth roofline: the bytes one step reads (the weights a token uses
plus the cache, from the artifact's cost model) / the triad's bandwidth / the step's time.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import big_model  # noqa: E402
import engines  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("POLYPORT_LLAMA_CPP", Path.home() / ".cache" / "polyport" / "llama.cpp"))
TARGETS = ("llama-bench", "llama-quantize", "llama")
CHECK_TOKENS = 24
CHECK_TOLERANCE = 1e-3          # x max|logit|: ggml sums in another order (and its SiLU/exp approximations)


def log(msg: str) -> None:
    print(f"llama_cpp: {msg}", file=sys.stderr, flush=True)


# ---- llama.cpp: source, build, conversion -------------------------------------------------------
def source_dir() -> Path:
    """The sdist's root (llama_cpp/ bindings, vendor/llama.cpp), downloaded and unpacked once."""
    root = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if (root / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "--no-binary", ":all:", "--no-deps", "-d", str(CACHE)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")
    return root


def llama_dir() -> Path:
    return source_dir() / "vendor" / "llama.cpp"


def build() -> Path:
    """The folder holding llama-bench, llama-quantize and libllama.so (built once)."""
    bin_dir = CACHE / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS[:2]) and (bin_dir / "libllama.so").exists():
        return bin_dir
    src = llama_dir()
    log(f"building llama.cpp ({', '.join(TARGETS)}) in {CACHE / 'build'}: minutes, once")
    subprocess.run(["cmake", "-S", str(src), "-B", str(CACHE / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(CACHE / "build"), "-j", "2", "--target", *TARGETS], check=True,
                   stdout=subprocess.DEVNULL)
    return bin_dir


# Our checkpoints' tokenizer is a byte-level BPE with GPT-2's pre-tokenizer regex (big_model.py). The
# converter names pre-tokenizers by hashing a known vocab's token ids for a test string, which a fresh
# vocab cannot match, so the wrapper names it: "gpt-2" is the pre-tokenizer llama.cpp runs for it.
# The Llama converter imports sentencepiece before it looks for a tokenizer.model (there is none
# here): without the package, it is told so first and falls through to the BPE path.
CONVERT = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base
TextModel = conversion.base.TextModel
sentencepiece = TextModel._create_vocab_sentencepiece
def no_tokenizer_model(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return sentencepiece(self)
TextModel._create_vocab_sentencepiece = no_tokenizer_model
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(hf_dir: Path, outtype: str, bin_dir: Path) -> Path:
    """hf_dir -> NAME.OUTTYPE.gguf next to it (f32 and q8_0 by the converter, q4_0 by llama-quantize)."""
    name = hf_dir.name[:-len(".hf")]
    out = hf_dir.with_name(f"{name}.{outtype}.gguf")
    if out.exists():
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    log(f"converting {hf_dir.name} to {out.name}")
    if outtype in ("f32", "q8_0", "f16", "bf16"):
        with open(out.with_suffix(".log"), "w") as err:
            subprocess.run([sys.executable, "-c", CONVERT, str(llama_dir()), str(hf_dir), "--outtype", outtype,
                            "--outfile", str(tmp)], check=True, stdout=subprocess.DEVNULL, stderr=err)
    else:
        subprocess.run([str(bin_dir / "llama-quantize"), str(convert(hf_dir, "f32", bin_dir)), str(tmp),
                        outtype.upper(), "2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.replace(tmp, out)
    return out


# ---- the logits check ---------------------------------------------------------------------------
def llama_cpp_bindings(bin_dir: Path):
    """llama-cpp-python's low-level ctypes module over the libllama built here (its package __init__,
    which pulls in the high-level API's extra dependencies, is skipped)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(source_dir() / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


def llama_cpp_logits(gguf: Path, ids, bin_dir: Path, threads: int):
    """float32 [len(ids), vocab]: llama.cpp's logits at every position of one sequence."""
    import numpy as np
    ll = llama_cpp_bindings(bin_dir)
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    model = ll.llama_model_load_from_file(str(gguf).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    cp = ll.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(64, len(ids))
    cp.n_threads = cp.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, cp)
    batch = ll.llama_batch_init(len(ids), 0, 1)
    batch.n_tokens = len(ids)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    if ll.llama_decode(ctx, batch) != 0:
        raise RuntimeError(f"llama_decode failed on {gguf}")
    vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    out = np.stack([np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy()
                    for i in range(len(ids))])
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return out


def check_logits(name: str, hf_dir: Path, gguf: Path, bin_dir: Path, threads: int) -> dict:
    """Max |llama.cpp - PyTorch| over every position of a random prompt, relative to max |logit|."""
    import numpy as np
    import torch
    import transformers
    cfg = json.loads((hf_dir / "config.json").read_text())
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], CHECK_TOKENS)
    got = llama_cpp_logits(gguf, ids, bin_dir, threads)
    model = getattr(transformers, big_model.MODELS[name][1]).from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy()
    err = float(np.abs(got - want).max() / np.abs(want).max())
    return {"model": name, "tokens": CHECK_TOKENS, "max_rel_err": err, "ok": err <= CHECK_TOLERANCE,
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean())}


# ---- timing (children) --------------------------------------------------------------------------
def llama_bench(gguf: Path, bin_dir: Path, context: int, tokens: int, threads: int, reps: int = 3) -> list[float]:
    """ms per output token of each llama-bench repetition: `-n tokens` generated after `-d context`."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
                          "-n", str(tokens), "-d", str(context), "-r", str(reps), "-o", "json"],
                         check=True, capture_output=True, text=True)
    (row,) = json.loads(out.stdout)
    return [1e3 / s for s in row["samples_ts"]]


def polyport_decode(onnx: Path, art: Path, context: int, tokens: int, threads: int) -> list[float]:
    spec = {"kind": "decode", "onnx": str(onnx), "artifact": str(art), "threads": threads, "prompts": [],
            "contexts": [context], "runs": 1, "steps": tokens}
    out = engines.run_child(spec)
    if "skip" in out or "skip" in out["rows"][0]:
        raise RuntimeError(f"polyport decode of {onnx.name} at {context}: {out.get('skip') or out['rows'][0]['skip']}")
    return out["rows"][0]["times_ms"]


def measure(name: str, onnx: Path, art: Path, gguf: Path, bin_dir: Path, args) -> list[dict]:
    from polyport.runtime.artifact import Artifact
    from polyport.runtime.bench import tpot_bytes
    manifest = Artifact(art).manifest
    cost, generation = manifest.get("cost") or {}, manifest.get("generation") or {}
    triad = {"kind": "triad", "threads": args.threads, "runs": 5, "warmup": 1}
    rows = []
    for context in args.contexts:
        got = {"polyport": [], "llama.cpp": [], "gbps": [], "load": []}
        jobs = [("polyport", lambda: polyport_decode(onnx, art, context, args.tokens, args.threads)),
                ("llama.cpp", lambda: llama_bench(gguf, bin_dir, context, args.tokens, args.threads)),
                ("gbps", lambda: engines.run_child(triad)["gbps"])]
        for r in range(args.rounds):
            got["load"].append(os.getloadavg()[0])
            for key, job in (jobs if r % 2 == 0 else jobs[::-1]):
                log(f"{name} context {context} round {r + 1}/{args.rounds}: {key}")
                got[key].append(statistics.median(job()))
        row = {"model": name, "context": context, "load_avg": engines.spread(got["load"])}
        for key in ("polyport", "llama.cpp", "gbps"):
            row[key] = engines.spread(got[key])
        row["ratio"] = engines.spread([c / p for c, p in zip(got["llama.cpp"], got["polyport"])])
        nbytes = tpot_bytes(cost, generation, context)
        row["bytes_per_token"] = nbytes
        row["roofline_fraction"] = engines.spread([nbytes / (g * 1e9) / (p / 1e3)
                                                   for g, p in zip(got["gbps"], got["polyport"])])
        row["llama_cpp_roofline_fraction"] = engines.spread([nbytes / (g * 1e9) / (c / 1e3)
                                                             for g, c in zip(got["gbps"], got["llama.cpp"])])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], checks: list[dict], threads: int) -> str:
    f = lambda s: f"{s['median']:.3g} ({s['min']:.3g}–{s['max']:.3g})"      # noqa: E731
    pct = lambda s: f"{s['median']:.0%} ({s['min']:.0%}–{s['max']:.0%})"   # noqa: E731
    lines = [f"Decode, batch 1, {threads} threads, F32; each engine alone in its own process, alternated; "
             "medians over rounds (min–max). Ratio = llama.cpp ms / polyport ms per round (above 1: polyport "
             "is faster). Roofline = (weight bytes a token reads + cache bytes) / triad bandwidth / time.", "",
             "| model | context | polyport ms/token | llama.cpp ms/token | llama.cpp / polyport | polyport roofline | "
             "llama.cpp roofline | triad GB/s | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['context']} | {f(r['polyport'])} | {f(r['llama.cpp'])} | "
                     f"**{r['ratio']['median']:.2f}x** ({r['ratio']['min']:.2f}–{r['ratio']['max']:.2f}) | "
                     f"{pct(r['roofline_fraction'])} | {pct(r['llama_cpp_roofline_fraction'])} | "
                     f"{r['gbps']['median']:.1f} | {r['load_avg']['median']:.1f} |")
    if checks:
        lines += ["", "llama.cpp F32 logits against PyTorch (every position of a 24-token prompt): " + "; ".join(
            f"{c['model']} max err {c['max_rel_err']:.1e} x max|logit|, argmax agrees at {c['argmax_agree']:.0%}"
            for c in checks) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, help="models, GGUF files, artifacts and the JSON go here")
    ap.add_argument("--models", nargs="+", default=list(big_model.DECODE_MODELS), choices=sorted(big_model.MODELS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--tokens", type=int, default=16, help="output tokens timed per child")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="per engine (default: the CPUs this process may use)")
    ap.add_argument("--outtypes", nargs="+", default=["f32"], help="GGUF files to write (f32 is the one timed)")
    ap.add_argument("--no-check", action="store_true", help="skip the logits check against PyTorch")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--check-child", nargs=3, metavar=("NAME", "HF_DIR", "GGUF"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from polyport.devices import usable_cpus
    args.threads = args.threads or usable_cpus()
    bin_dir = build()
    if args.build_only:
        print(bin_dir)
        return 0
    if args.check_child:
        name, hf_dir, gguf = args.check_child
        print(json.dumps(check_logits(name, Path(hf_dir), Path(gguf), bin_dir, args.threads)))
        return 0
    if args.work_dir is None:
        ap.error("--work-dir is required")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, checks = [], []
    for name in args.models:
        onnx = big_model.export_big(args.work_dir, log, name)
        hf_dir = args.work_dir / f"{name}.hf"
        ggufs = {t: convert(hf_dir, t, bin_dir) for t in ["f32"] + [t for t in args.outtypes if t != "f32"]}
        if not args.no_check:         # in a child: PyTorch's and llama.cpp's copies of the weights are freed after
            out = subprocess.run([sys.executable, __file__, "--check-child", name, str(hf_dir), str(ggufs["f32"]),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True)
            check = json.loads(out.stdout.strip().splitlines()[-1])
            log(f"{name}: llama.cpp F32 logits vs PyTorch: max err {check['max_rel_err']:.2e} x max|logit|")
            if not check["ok"]:
                raise SystemExit(f"llama_cpp: error: {name}: llama.cpp's F32 logits differ from PyTorch's by "
                                 f"{check['max_rel_err']:.2e} x max|logit| (> {CHECK_TOLERANCE}); not timing it")
            checks.append(check)
        art = engines.compile_cached(onnx, args.work_dir, log)
        rows += measure(name, onnx, art, ggufs["f32"], bin_dir, args)
    print(markdown(rows, checks, args.threads))
    out = args.work_dir / "llama_cpp.json"
    out.write_text(json.dumps({"rows": rows, "checks": checks, "threads": args.threads,
                               "llama_cpp_python": LLAMA_CPP_PYTHON, "seconds": time.perf_counter() - start},
                              indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

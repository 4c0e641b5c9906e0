#!/usr/bin/env python
"""Decode against llama.cpp on the same weights (F32, int8 vs Q8_0, int4 vs Q4_0; batch 1 and 8), each engine alone.

    python benchmarks/llama_cpp.py --work-dir /tmp/bench --schemes f32 int8 int4 --batch 1 8   # the README's table
    python benchmarks/llama_cpp.py --work-dir DIR [--models llama_500m ...] [--contexts 128 1024]
        [--schemes f32 int8 int4] [--batch 1 8] [--rounds 3] [--tokens 16] [--threads 2] [--no-check]
        [--outtypes f16 ...] [--prompts 128 512 [--prompt-runs 3] [--no-decode]]
    python benchmarks/llama_cpp.py --build-only                  # libllama, llama-bench, llama-quantize

llama.cpp comes from the PyPI sdist of llama-cpp-python (pinned: LLAMA_CPP_PYTHON), which vendors
it: `pip download` fetches the sdist once into the cache dir ($POLYPORT_LLAMA_CPP, default
~/.cache/polyport/llama.cpp), and cmake builds the shared libllama there (Release, this CPU's
features without AMX (X86_OPTIONS), 2 jobs; `--build-only` also builds the llama-bench and
llama-quantize tools, which nothing here needs). Then, per model of benchmarks/big_model.py
(`llama_tiny` runs every path in minutes, a smoke test, never a measurement):
1. the model is built and exported once (NAME.onnx and the Hugging Face checkpoint NAME.hf/);
2. llama.cpp's convert_hf_to_gguf.py writes NAME.f32.gguf and NAME.q8_0.gguf, and libllama's
   llama_model_quantize (what llama-quantize runs) NAME.q4_0.gguf from the F32 file, its LM head
   (`output.weight`) in Q4_0 too (llama-quantize's default would be Q6_K): the types --schemes times
   and any other --outtypes;
3. llama.cpp's F32 logits (llama-cpp-python's ctypes bindings over the libllama built here, every
   position of one prompt) are checked against PyTorch's before anything is timed;
4. polyport compiles NAME.onnx for the cpu target per scheme (cached, benchmarks/engines.py): f32,
   or `--quantize int8|int4 --group-size 32 --quantize-lm-head --quantize-embeddings`. Q8_0 and Q4_0
   are blocks of 32 weights with one scale (f16 there, f32 here), symmetric, and llama.cpp's converter
   keeps the MoE router in F32 as polyport does: like for like, LM head and token embeddings included;
5. per scheme, batch and context, rounds alternate three children, each alone in its process: a
   STREAM triad (this machine's bandwidth now), polyport's decode (engines.py's `decode` child:
   `start` of the CONTEXT-token prompt in all BATCH sequences, then one `append` a step of one token
   per sequence) and llama.cpp's (the prompt in sequence 0, copied into sequences 1..BATCH-1 with
   llama_memory_seq_cp, each sequence its own KV stream (not unified, as polyport's caches), then
   one `llama_decode` a step of one token per sequence, the logits read back: what
   `llama-bench -n TOKENS -d CONTEXT` times at batch 1, without building its tools). Both decode
   the same token ids (rows of one seeded draw), so a MoE step reads the same experts in each.
With --prompts, per scheme and prompt length the same rounds alternate polyport's time to first token
(`start` of one PROMPT-token prompt: the prefill program and the last row's logits) and llama.cpp's
prompt processing (PROMPT tokens in one `llama_decode` on an emptied cache: what `llama-bench -p
PROMPT` times), each --prompt-runs calls after a warm-up call.
Reported per scheme, batch and context: each engine's time per decode step (median over rounds of
each child's median; min..max) and tokens/s (BATCH per step), the ratio llama.cpp ms / polyport
ms per round (above 1: polyport faster), batch B tokens/s / batch 1 tokens/s, and the fraction of
the bandwidth roofline: the bytes one step reads (the weights BATCH tokens use, at the scheme's
stored bytes, plus every sequence's cache, from the artifact's cost model; the same bytes for
llama.cpp, whose f16 block scales make its Q8_0 / Q4_0 weights 6% / 10% smaller) / the triad's
bandwidth / the step's time. Then each scheme's weight bytes: the artifact's weights file, the
bytes one token's step reads, and the GGUF's tensors.
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
TARGETS = ("llama", "llama-quantize", "llama-bench")     # libllama times and checks; the tools for users
CHECK_TOKENS = 24
GGML_TYPE_F32 = 0
# x max|logit|, per position: ggml sums in other orders and approximates exp/SiLU, over 11-16
# random-weight layers (measured: at most 5.7e-3 on llama_500m). A random router has near-ties, and
# one token routed to another expert is off by far more (0.16 at one position of deepseek_v3_600m,
# the others within 5.3e-3), so CHECK_POSITIONS of the positions must be within the tolerance.
# A near-tie early in the prompt moves every later position through the cache (qwen3_moe_700m, prompt
# 7: a top-4 / top-5 router gap of 3e-5 at position 5, layer 1; 5 of 24 positions within; on an AVX2
# EPYC 2 of 6 prompts passed, on an AVX-512 Xeon the first did), so up to CHECK_PROMPTS prompts are
# tried: a wrong RoPE, norm, scale or scoring function fails every one.
CHECK_TOLERANCE = 1e-2
CHECK_POSITIONS = 0.9
CHECK_PROMPTS = 8
# --schemes: polyport's --quantize (None: f32) and the GGUF type llama.cpp times against it
SCHEMES = {"f32": (None, "f32"), "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}
GROUP_SIZE = 32                      # Q8_0's and Q4_0's block: 32 weights share one scale
CONVERTER_TYPES = ("f32", "q8_0", "f16", "bf16")     # convert_hf_to_gguf.py's; others: llama_model_quantize


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


# x86 features as /proc/cpuinfo names them -> ggml's CMake options. The build is GGML_NATIVE's (-march=native)
# without AMX: this sandbox's kernel does not run AMX tile instructions (SIGILL at the first Q8_0 / Q4_0
# matmul, in the AMX buffer ggml picks for them whenever the compiler targets AMX).
X86_OPTIONS = {"sse4_2": "SSE42", "f16c": "F16C", "fma": "FMA", "bmi2": "BMI2", "avx": "AVX", "avx2": "AVX2",
               "avx_vnni": "AVX_VNNI", "avx512f avx512cd avx512vl avx512dq avx512bw": "AVX512",
               "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16"}


def cpu_options() -> list[str]:
    """ggml's CPU options for this machine: every X86_OPTIONS feature it has; elsewhere GGML_NATIVE."""
    from polyport.devices import host_cpu_info
    flags = host_cpu_info()["flags"]
    if "avx" not in flags:
        return ["-DGGML_NATIVE=ON"]
    have = [f"-DGGML_{o}={'ON' if set(f.split()) <= flags else 'OFF'}" for f, o in X86_OPTIONS.items()]
    return ["-DGGML_NATIVE=OFF", *have] + [f"-DGGML_AMX_{t}=OFF" for t in ("TILE", "INT8", "BF16")]


def build(targets=("llama",)) -> Path:
    """The folder holding what `targets` build (libllama.so, llama-quantize, llama-bench), built once (again
    where an earlier build was configured otherwise: only what the changed options compile is rebuilt)."""
    bin_dir = CACHE / "build" / "bin"
    files = {"llama": "libllama.so"}
    configure = ["-DCMAKE_BUILD_TYPE=Release", *cpu_options(), "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF"]
    if all((bin_dir / files.get(t, t)).exists() for t in targets) and configured(configure):
        return bin_dir
    src = llama_dir()
    log(f"building llama.cpp ({', '.join(targets)}) in {CACHE / 'build'}: minutes, once")
    subprocess.run(["cmake", "-S", str(src), "-B", str(CACHE / "build"), *configure], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(CACHE / "build"), "-j", "2", "--target", *targets], check=True,
                   stdout=subprocess.DEVNULL)
    return bin_dir


def configured(options: list[str]) -> bool:
    """Whether the build folder's CMakeCache.txt holds every -DNAME=VALUE of `options` (the cache is shared:
    another configure may have changed it since)."""
    try:
        text = (CACHE / "build" / "CMakeCache.txt").read_text()
    except OSError:
        return False
    cache = {k.split(":", 1)[0]: v for k, _, v in (line.partition("=") for line in text.splitlines())
             if ":" in k and not k.startswith(("//", "#"))}
    return all(cache.get(o[2:].split("=", 1)[0]) == o.split("=", 1)[1] for o in options)


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
    """hf_dir -> NAME.OUTTYPE.gguf next to it (f32 and q8_0 by the converter, q4_0 by llama_model_quantize
    in a child). A file whose LM head is of another type (llama-quantize's default) is written again."""
    name = hf_dir.name[:-len(".hf")]
    out = hf_dir.with_name(f"{name}.{outtype}.gguf")
    if out.exists() and gguf_tensors(out).get("output.weight", (outtype.upper(),))[0] == outtype.upper():
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    log(f"converting {hf_dir.name} to {out.name}")
    if outtype in CONVERTER_TYPES:
        with open(out.with_suffix(".log"), "w") as err:
            subprocess.run([sys.executable, "-c", CONVERT, str(llama_dir()), str(hf_dir), "--outtype", outtype,
                            "--outfile", str(tmp)], check=True, stdout=subprocess.DEVNULL, stderr=err)
    else:
        run_self("--quantize-child", convert(hf_dir, "f32", bin_dir), tmp, outtype)
    os.replace(tmp, out)
    return out


def quantize_gguf(src: Path, dst: Path, outtype: str, bin_dir: Path) -> None:
    """llama-quantize SRC DST OUTTYPE through libllama, with the LM head in OUTTYPE too."""
    ll = llama_cpp_bindings(bin_dir)
    key = outtype.upper()
    if not hasattr(ll, f"LLAMA_FTYPE_MOSTLY_{key}"):
        raise SystemExit(f"llama_cpp: error: --outtypes {outtype}: not a llama.cpp file type")
    ll.llama_backend_init()
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, f"LLAMA_FTYPE_MOSTLY_{key}")
    params.output_tensor_type = getattr(ll, f"GGML_TYPE_{key}", params.output_tensor_type)
    params.nthread = 2
    if ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src.name} -> {outtype} failed")


def gguf_tensors(gguf: Path) -> dict[str, tuple[str, int]]:
    """name -> (ggml type, bytes) of each tensor of a GGUF file (its header, read by llama.cpp's gguf-py)."""
    sys.path.insert(0, str(llama_dir() / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(gguf).tensors}


# ---- the logits check ---------------------------------------------------------------------------
def llama_cpp_bindings(bin_dir: Path):
    """llama-cpp-python's low-level ctypes module over the libllama built here (its package __init__,
    which pulls in the high-level API's extra dependencies, is skipped)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(source_dir() / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


class LlamaCpp:
    """One llama.cpp model and context through libllama (`threads` for prompt and generation, F32 cache),
    for `seqs` sequences of up to `n_ctx` tokens each, each in its own KV stream (not unified)."""

    def __init__(self, gguf: Path, bin_dir: Path, n_ctx: int, threads: int, seqs: int = 1):
        self.ll = ll = llama_cpp_bindings(bin_dir)
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx * seqs
        cp.n_seq_max = seqs
        cp.kv_unified = False
        cp.n_batch = cp.n_ubatch = min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = GGML_TYPE_F32      # an F32 cache, as polyport's (llama.cpp defaults to F16)
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {gguf}")
        self.vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.batch = ll.llama_batch_init(cp.n_batch, 0, 1)
        self.n_batch = cp.n_batch

    def decode(self, ids, pos0: int, all_logits: bool = False):
        """Feed ids to sequence 0 at positions pos0.. (in batches); float32 logits of every row ([n, vocab])
        or the last."""
        import numpy as np
        ll, b, rows = self.ll, self.batch, []
        for s in range(0, len(ids), self.n_batch):
            part = ids[s:s + self.n_batch]
            b.n_tokens = len(part)
            for i, t in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = int(t), pos0 + s + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = int(all_logits or s + i == len(ids) - 1)
            if ll.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            for i in range(len(part)):
                if all_logits or s + i == len(ids) - 1:
                    rows.append(np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).copy())
        return np.stack(rows)

    def step(self, tokens, pos: int):
        """One token for each of sequences 0..len(tokens)-1, all at position `pos`, in one llama_decode;
        float32 logits [len(tokens), vocab]."""
        import numpy as np
        ll, b = self.ll, self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), pos, 1, 1
            b.seq_id[i][0] = i
        if ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return np.stack([np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).copy()
                         for i in range(len(tokens))])

    def copy_sequence(self, src: int, dst: int) -> None:
        """Sequence dst's cache := src's (a copy of the KV stream, made at the next llama_decode)."""
        self.ll.llama_memory_seq_cp(self.ll.llama_get_memory(self.ctx), src, dst, -1, -1)

    def close(self):
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def check_logits(name: str, hf_dir: Path, gguf: Path, bin_dir: Path, threads: int) -> dict:
    """max |llama.cpp - PyTorch| / max |logit| at each position of a random prompt, and the verdict: the
    first of CHECK_PROMPTS prompts that passes, else the last."""
    import numpy as np
    import torch
    import transformers
    cfg = json.loads((hf_dir / "config.json").read_text())
    engine = LlamaCpp(gguf, bin_dir, 64, threads)
    model = getattr(transformers, big_model.MODELS[name][1]).from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    for prompt in range(CHECK_PROMPTS):
        ids = np.random.default_rng(7 + prompt).integers(0, cfg["vocab_size"], CHECK_TOKENS)
        engine.ll.llama_memory_clear(engine.ll.llama_get_memory(engine.ctx), True)
        got = engine.decode(ids, 0, all_logits=True)
        with torch.no_grad():
            want = model(torch.from_numpy(ids)[None], use_cache=False).logits[0].numpy()
        err = np.abs(got - want).max(-1) / np.abs(want).max()
        within = float((err <= CHECK_TOLERANCE).mean())
        if within >= CHECK_POSITIONS:
            break
    engine.close()
    return {"model": name, "tokens": CHECK_TOKENS, "prompts": prompt + 1, "max_rel_err": float(err.max()),
            "median_rel_err": float(np.median(err)), "within": within, "ok": within >= CHECK_POSITIONS,
            "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean())}


# ---- timing (children) --------------------------------------------------------------------------
def llama_cpp_decode(gguf: Path, bin_dir: Path, context: int, tokens: int, threads: int, batch: int = 1) -> list[float]:
    """ms of each of `tokens` decode steps (one token per sequence of `batch`, one llama_decode, the logits
    read back) after a prompt of `context` tokens in sequence 0, copied to the others: at batch 1 what
    `llama-bench -n tokens -d context` times, through the same libllama calls."""
    engine = LlamaCpp(gguf, bin_dir, context + tokens + 2, threads, seqs=batch)
    ids = engines.decode_tokens(batch, context, tokens)
    engine.decode(ids[0, :context], 0)
    for seq in range(1, batch):
        engine.copy_sequence(0, seq)
    engine.step(ids[:, context], context)                 # warm-up (and the copies)
    times = []
    for t in range(1, tokens + 1):
        start = time.perf_counter()
        engine.step(ids[:, context + t], context + t)
        times.append((time.perf_counter() - start) * 1e3)
    engine.close()
    return times


def llama_cpp_prompt(gguf: Path, bin_dir: Path, prompt: int, runs: int, threads: int) -> list[float]:
    """ms of each of `runs` prompt-processing calls (`prompt` tokens in one llama_decode on an emptied cache,
    the last row's logits read back): what `llama-bench -p PROMPT` times, through the same libllama calls."""
    import numpy as np
    engine = LlamaCpp(gguf, bin_dir, prompt + 2, threads)
    ids = np.random.default_rng(0).integers(0, 100, prompt)
    memory = engine.ll.llama_get_memory(engine.ctx)
    times = []
    for r in range(runs + 1):                             # the first call warms up
        engine.ll.llama_memory_clear(memory, True)
        start = time.perf_counter()
        engine.decode(ids, 0)
        if r:
            times.append((time.perf_counter() - start) * 1e3)
    engine.close()
    return times


def polyport_prompt(onnx: Path, art: Path, prompt: int, runs: int, threads: int) -> list[float]:
    """ms of each of `runs` `start(prompt)` calls: the prefill program over `prompt` tokens and the last
    row's logits (engines.py's `decode` child, time to first token)."""
    return _polyport_times(onnx, art, f"prefill at {prompt}", threads, prompts=[prompt], contexts=[], runs=runs,
                           steps=0, batch=1)


def polyport_decode(onnx: Path, art: Path, context: int, tokens: int, threads: int, batch: int = 1) -> list[float]:
    return _polyport_times(onnx, art, f"decode at {context}", threads, prompts=[], contexts=[context], runs=1,
                           steps=tokens, batch=batch)


def _polyport_times(onnx: Path, art: Path, what: str, threads: int, **spec) -> list[float]:
    """The times of the one row an engines.py `decode` child measures for `spec`; its skip, as an error."""
    out = engines.run_child({"kind": "decode", "onnx": str(onnx), "artifact": str(art), "threads": threads, **spec})
    if "skip" in out or "skip" in out["rows"][0]:
        raise RuntimeError(f"polyport {what} of {art.name}: {out.get('skip') or out['rows'][0]['skip']}")
    return out["rows"][0]["times_ms"]


def run_self(*argv) -> dict:
    """This script as a child process (one engine alone in it); its last stdout line, JSON."""
    out = subprocess.run([sys.executable, __file__, *map(str, argv)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:2]))} failed:\n" + "\n".join(out.stderr.splitlines()[-5:]))
    return json.loads(out.stdout.strip().splitlines()[-1])


def quantization(scheme: str):
    """polyport's WeightQuantization for a --schemes entry (None: f32)."""
    from polyport.passes.quantize_weights import WeightQuantization
    quantize = SCHEMES[scheme][0]
    return WeightQuantization(quantize, GROUP_SIZE, lm_head=True, embeddings=True) if quantize else None


def alternate(jobs: list, rounds: int, what: str) -> dict[str, list[float]]:
    """Each job's child once a round, the order reversed every other round; per key the median of each child's
    times, and the load average at each round's start under "load"."""
    got = {key: [] for key, _ in jobs} | {"load": []}
    for r in range(rounds):
        got["load"].append(os.getloadavg()[0])
        for key, job in (jobs if r % 2 == 0 else jobs[::-1]):
            log(f"{what} round {r + 1}/{rounds}: {key}")
            got[key].append(statistics.median(job()))
    return got


def engine_columns(got: dict[str, list[float]], tokens: int) -> dict:
    """A row's per-engine columns: ms, tokens/s (`tokens` a call), llama.cpp ms / polyport ms per round, load."""
    row = {"load_avg": engines.spread(got["load"])}
    for key in ("polyport", "llama.cpp"):
        row[key] = engines.spread(got[key])
        row[f"{key}_tok_s"] = engines.spread([tokens * 1e3 / t for t in got[key]])
    row["ratio"] = engines.spread([c / p for c, p in zip(got["llama.cpp"], got["polyport"])])
    return row


def measure(name: str, scheme: str, onnx: Path, art: Path, gguf: Path, args) -> list[dict]:
    """One row per (batch, context): rounds alternating the triad, polyport and llama.cpp children."""
    from polyport.runtime.artifact import Artifact
    from polyport.runtime.bench import tpot_bytes
    manifest = Artifact(art).manifest
    cost, generation = manifest.get("cost") or {}, manifest.get("generation") or {}
    triad = {"kind": "triad", "threads": args.threads, "runs": 5, "warmup": 1}
    rows = []
    for batch in args.batch:
        for context in args.contexts:
            jobs = [("polyport", lambda: polyport_decode(onnx, art, context, args.tokens, args.threads, batch)),
                    ("llama.cpp", lambda: run_self("--decode-child", gguf, context, "--tokens", args.tokens,
                                                   "--threads", args.threads, "--batch", batch)["times_ms"]),
                    ("gbps", lambda: engines.run_child(triad)["gbps"])]
            got = alternate(jobs, args.rounds, f"{name} {scheme} batch {batch} context {context}")
            row = {"model": name, "scheme": scheme, "gguf": SCHEMES[scheme][1], "batch": batch, "context": context,
                   "gbps": engines.spread(got["gbps"]), **engine_columns(got, batch)}
            nbytes = tpot_bytes(cost, generation, context, batch=batch)
            row["bytes_per_step"] = nbytes
            # the batch scaling a bandwidth-bound engine reaches: B tokens a step for the bytes' growth over batch 1
            row["scaling_ceiling"] = batch * tpot_bytes(cost, generation, context) / nbytes
            row["roofline_fraction"] = engines.spread([nbytes / (g * 1e9) / (p / 1e3)
                                                       for g, p in zip(got["gbps"], got["polyport"])])
            row["llama_cpp_roofline_fraction"] = engines.spread([nbytes / (g * 1e9) / (c / 1e3)
                                                                 for g, c in zip(got["gbps"], got["llama.cpp"])])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def measure_prompts(name: str, scheme: str, onnx: Path, art: Path, gguf: Path, args) -> list[dict]:
    """One row per --prompts length: rounds alternating polyport's and llama.cpp's prompt children."""
    rows = []
    for prompt in args.prompts:
        jobs = [("polyport", lambda: polyport_prompt(onnx, art, prompt, args.prompt_runs, args.threads)),
                ("llama.cpp", lambda: run_self("--prompt-child", gguf, prompt, "--prompt-runs", args.prompt_runs,
                                               "--threads", args.threads)["times_ms"])]
        got = alternate(jobs, args.rounds, f"{name} {scheme} prompt {prompt}")
        row = {"model": name, "scheme": scheme, "gguf": SCHEMES[scheme][1], "prompt": prompt,
               **engine_columns(got, prompt)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def weight_bytes(name: str, scheme: str, art: Path, gguf: Path) -> dict:
    """A scheme's weights: the artifact's file, what one token's decode step reads (cost model) and the GGUF's
    tensors (embeddings included on both sides)."""
    from polyport.runtime.artifact import Artifact
    from polyport.runtime.bench import tpot_bytes
    manifest = Artifact(art).manifest
    return {"model": name, "scheme": scheme, "gguf": SCHEMES[scheme][1],
            "artifact_weights": sum(f.stat().st_size for f in art.glob("*.safetensors")),
            "token_reads": tpot_bytes(manifest.get("cost") or {}, {}, 0),
            "gguf_tensors": sum(n for _, n in gguf_tensors(gguf).values())}


def markdown(rows: list[dict], sizes: list[dict], checks: list[dict], threads: int, prompts=()) -> str:
    f = lambda s: f"{s['median']:.3g} ({s['min']:.3g}–{s['max']:.3g})"      # noqa: E731
    pct = lambda s: f"{s['median']:.0%} ({s['min']:.0%}–{s['max']:.0%})"   # noqa: E731
    rate = lambda s: f"{s['median']:,.0f}" if s["median"] >= 100 else f"{s['median']:.3g}"    # noqa: E731
    one = {(r["model"], r["scheme"], r["context"]): r for r in rows if r["batch"] == 1}

    def scaling(r):            # batch B tokens/s over batch 1's, per engine
        b1 = one.get((r["model"], r["scheme"], r["context"]))
        if r["batch"] == 1 or b1 is None:
            return "–"
        got = " / ".join(f"{r[k]['median'] / b1[k]['median']:.2f}x" for k in ("polyport_tok_s", "llama.cpp_tok_s"))
        return f"{got} (ceiling {r['scaling_ceiling']:.2f}x)" if "scaling_ceiling" in r else got

    lines = [f"Decode, {threads} threads; each engine alone in its own process, alternated; medians over rounds "
             "(min–max). A step decodes one token of each of `batch` sequences. Ratio = llama.cpp ms / polyport ms "
             "per round (above 1: polyport is faster). Batch scaling = tokens/s over batch 1's (polyport / "
             "llama.cpp); its ceiling is batch x batch 1's bytes / the batch's bytes, where a batch's tokens read "
             "the experts uniform routing touches. Roofline = (weight bytes the step's tokens read, at the "
             "scheme's stored size, + every sequence's cache bytes) / triad bandwidth / time.", "",
             "| model | scheme (llama.cpp) | batch | context | polyport ms/step | llama.cpp ms/step | "
             "llama.cpp / polyport | polyport tok/s | llama.cpp tok/s | batch scaling | polyport roofline | "
             "llama.cpp roofline | triad GB/s | load avg |", "|---" * 14 + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['scheme']} ({r['gguf'].upper()}) | {r['batch']} | {r['context']} | "
                     f"{f(r['polyport'])} | {f(r['llama.cpp'])} | "
                     f"**{r['ratio']['median']:.2f}x** ({r['ratio']['min']:.2f}–{r['ratio']['max']:.2f}) | "
                     f"{rate(r['polyport_tok_s'])} | {rate(r['llama.cpp_tok_s'])} | {scaling(r)} | "
                     f"{pct(r['roofline_fraction'])} | {pct(r['llama_cpp_roofline_fraction'])} | "
                     f"{r['gbps']['median']:.1f} | {r['load_avg']['median']:.1f} |")
    if prompts:
        lines += ["", "Prompt processing (time to first token: one prefill call over PROMPT tokens and the last row's "
                      "logits; llama.cpp: one llama_decode on an emptied cache, as `llama-bench -p PROMPT`), medians "
                      "over rounds (min–max). Ratio = llama.cpp ms / polyport ms per round.", "",
                  "| model | scheme (llama.cpp) | prompt | polyport ms | llama.cpp ms | llama.cpp / polyport | "
                  "polyport tok/s | llama.cpp tok/s | load avg |", "|---" * 9 + "|"]
        lines += [f"| {r['model']} | {r['scheme']} ({r['gguf'].upper()}) | {r['prompt']} | {f(r['polyport'])} | "
                  f"{f(r['llama.cpp'])} | **{r['ratio']['median']:.2f}x** ({r['ratio']['min']:.2f}–"
                  f"{r['ratio']['max']:.2f}) | {rate(r['polyport_tok_s'])} | {rate(r['llama.cpp_tok_s'])} | "
                  f"{r['load_avg']['median']:.1f} |" for r in prompts]
    if sizes:
        mb = lambda n: f"{n / 1e6:.4g}"       # noqa: E731
        lines += ["", "Weight bytes per scheme (MB): polyport's artifact (weights.safetensors; embeddings in the "
                      "scheme), what one token's decode step reads of it (cost model: active experts only, no "
                      "embeddings), and the GGUF's tensors (embeddings in the scheme's type).", "",
                  "| model | scheme (llama.cpp) | polyport artifact | polyport bytes / token | llama.cpp GGUF |",
                  "|---|---|---|---|---|"]
        lines += [f"| {z['model']} | {z['scheme']} ({z['gguf'].upper()}) | {mb(z['artifact_weights'])} | "
                  f"{mb(z['token_reads'])} | {mb(z['gguf_tensors'])} |" for z in sizes]
    if checks:
        lines += ["", "llama.cpp F32 logits against PyTorch (each position of a 24-token prompt, max |diff| / "
                      "max |logit|): " + "; ".join(
                          f"{c['model']} median {c['median_rel_err']:.1e}, max {c['max_rel_err']:.1e}, argmax equal "
                          f"at {c['argmax_agree']:.0%} (prompt {c.get('prompts', 1)})" for c in checks) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, help="models, GGUF files, artifacts and the JSON go here")
    ap.add_argument("--models", nargs="+", default=list(big_model.DECODE_MODELS), choices=sorted(big_model.MODELS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--schemes", nargs="+", default=["f32"], choices=list(SCHEMES),
                    help="weights: f32 against llama.cpp F32, int8 against Q8_0, int4 against Q4_0 (groups of 32)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences decoded together per step")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per child")
    ap.add_argument("--prompts", type=int, nargs="+", default=[],
                    help="also time prompt processing (time to first token) at these prompt lengths")
    ap.add_argument("--prompt-runs", type=int, default=3, help="prompt calls timed per child")
    ap.add_argument("--no-decode", action="store_true", help="time only --prompts, no decode steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="per engine (default: the CPUs this process may use)")
    ap.add_argument("--outtypes", nargs="+", default=[], help="more GGUF files to write (the schemes' are written)")
    ap.add_argument("--no-check", action="store_true", help="skip the logits check against PyTorch")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--check-child", nargs=3, metavar=("NAME", "HF_DIR", "GGUF"), help=argparse.SUPPRESS)
    ap.add_argument("--decode-child", nargs=2, metavar=("GGUF", "CONTEXT"), help=argparse.SUPPRESS)
    ap.add_argument("--prompt-child", nargs=2, metavar=("GGUF", "PROMPT"), help=argparse.SUPPRESS)
    ap.add_argument("--quantize-child", nargs=3, metavar=("SRC", "DST", "OUTTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batch):
        ap.error(f"--batch takes positive sequence counts, not {args.batch}")
    from polyport.devices import usable_cpus
    args.threads = args.threads or usable_cpus()
    if args.build_only:
        print(build(TARGETS))
        return 0
    bin_dir = build()
    if args.check_child:
        name, hf_dir, gguf = args.check_child
        print(json.dumps(check_logits(name, Path(hf_dir), Path(gguf), bin_dir, args.threads)))
        return 0
    if args.decode_child:
        gguf, context = args.decode_child
        print(json.dumps({"times_ms": llama_cpp_decode(Path(gguf), bin_dir, int(context), args.tokens, args.threads,
                                                       args.batch[0])}))
        return 0
    if args.prompt_child:
        gguf, prompt = args.prompt_child
        print(json.dumps({"times_ms": llama_cpp_prompt(Path(gguf), bin_dir, int(prompt), args.prompt_runs,
                                                       args.threads)}))
        return 0
    if args.quantize_child:
        src, dst, outtype = args.quantize_child
        quantize_gguf(Path(src), Path(dst), outtype, bin_dir)
        print(json.dumps({"gguf": dst}))
        return 0
    if args.work_dir is None:
        ap.error("--work-dir is required")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, sizes, checks, prompts = [], [], [], []
    outtypes = list(dict.fromkeys(["f32"] + [SCHEMES[s][1] for s in args.schemes] + args.outtypes))
    for name in args.models:
        onnx = big_model.export_big(args.work_dir, log, name)
        hf_dir = args.work_dir / f"{name}.hf"
        ggufs = {t: convert(hf_dir, t, bin_dir) for t in outtypes}
        if not args.no_check:         # in a child: PyTorch's and llama.cpp's copies of the weights are freed after
            check = run_self("--check-child", name, hf_dir, ggufs["f32"], "--threads", args.threads)
            log(f"{name}: llama.cpp F32 logits vs PyTorch: median err {check['median_rel_err']:.1e}, max "
                f"{check['max_rel_err']:.1e} x max|logit|; {check['within']:.0%} of positions within {CHECK_TOLERANCE} "
                f"(prompt {check['prompts']} of {CHECK_PROMPTS})")
            if not check["ok"]:
                raise SystemExit(f"llama_cpp: error: {name}: llama.cpp's F32 logits differ from PyTorch's by more "
                                 f"than {CHECK_TOLERANCE} x max|logit| at {1 - check['within']:.0%} of the positions "
                                 f"of each of {CHECK_PROMPTS} prompts; not timing it")
            checks.append(check)
        for scheme in args.schemes:
            art = engines.compile_cached(onnx, args.work_dir, log, quantization=quantization(scheme))
            gguf = ggufs[SCHEMES[scheme][1]]
            sizes.append(weight_bytes(name, scheme, art, gguf))
            if not args.no_decode:
                rows += measure(name, scheme, onnx, art, gguf, args)
            prompts += measure_prompts(name, scheme, onnx, art, gguf, args)
    print(markdown(rows, sizes, checks, args.threads, prompts))
    out = args.work_dir / "llama_cpp.json"
    out.write_text(json.dumps({"rows": rows, "prompts": prompts, "weight_bytes": sizes, "checks": checks,
                               "threads": args.threads,
                               "llama_cpp_python": LLAMA_CPP_PYTHON, "seconds": time.perf_counter() - start},
                              indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

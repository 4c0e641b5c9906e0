"""Quality and size of each low-precision scheme against f32, on corpus models (polyport cpu artifacts).

    PYTHONPATH=... python benchmarks/quant_quality.py [--models llama_a qwen3_moe_a deepseek_v3_a] [--work-dir DIR]

Per model and scheme (f32, bf16, f16, int8, int4/g32, int4/g128, fp8/g128, each low-precision one also with
`--quantize-embeddings`, "+emb"): the logits error at seq 16, max |scheme - f32| / max |f32 logit|; greedy-token
agreement over 24 tokens (f32's greedy continuation of an 8-token prompt fed to every scheme, teacher-forced:
the share of the 24 positions whose argmax equals f32's); the artifact's weights.safetensors bytes (the LM head
stays f32 in --quantize schemes, the embedding table in all but "+emb"), and of them the embedding table's
(the [vocab, hidden] weight: f32, or codes + scales); and the bytes of the layers a scheme converts (codes +
scales) against the same layers in f32. Random-weight models make low precision look harsh.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

import numpy as np

LOW = [("bf16", ["--dtype", "bf16"]), ("f16", ["--dtype", "f16"]),
       ("int8/g32", ["--quantize", "int8", "--group-size", "32"]),
       ("int4/g32", ["--quantize", "int4", "--group-size", "32"]),
       ("int4/g128", ["--quantize", "int4", "--group-size", "128"]),
       ("fp8/g128", ["--quantize", "fp8", "--group-size", "128"])]
SCHEMES = [("f32", [])] + LOW + [(f"{label} +emb", opts + ["--quantize-embeddings"]) for label, opts in LOW]
PROMPT, NEW = 8, 24


def _converted_bytes(art: pathlib.Path, f32: dict) -> tuple[int, int]:
    """(bytes of the converted layers' codes and scales, bytes of the same layers in the f32 artifact)."""
    from polyport.runtime import safetensors
    stored = safetensors.load(art / "weights.safetensors")
    derived = [n for n in stored if n not in f32 and n.rsplit("/", 1)[0] in f32]    # WEIGHT/<scheme|scales>_i
    codes = [n for n in derived if stored[n].dtype != np.float32]
    return sum(stored[n].nbytes for n in derived), sum(f32[n.rsplit("/", 1)[0]].nbytes for n in codes)


def _table_bytes(art: pathlib.Path, table: str) -> int:
    """Bytes of the embedding table as stored: f32, or its codes and scales (TABLE/<scheme>, TABLE/scales)."""
    from polyport.runtime import safetensors
    stored = safetensors.load(art / "weights.safetensors")
    return sum(a.nbytes for n, a in stored.items() if n == table or n.startswith(table + "/"))


def _logits(sess, ids):
    return sess.run({"input_ids": ids})[sess.output_names[0]][0]


def main() -> None:
    from click.testing import CliRunner
    from polyport.cli import main as cli
    from polyport.runtime import session
    from polyport.tests.real_models import corpus, model_path, token_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["llama_a", "qwen3_moe_a", "deepseek_v3_a"])
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    work = pathlib.Path(args.work_dir or os.path.join(tempfile.gettempdir(), "polyport_quant_quality"))
    work.mkdir(parents=True, exist_ok=True)
    from polyport.runtime import safetensors
    print("| model | scheme | logits err vs f32 (seq 16) | greedy agreement /24 | weights.safetensors bytes "
          "| of which the embedding table | converted layers: bytes (f32 bytes) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        vocab = int(corpus()[name]["hf_config"]["vocab_size"])
        probe = token_ids(16, vocab=vocab)["input_ids"]
        base, greedy = None, None
        for label, options in SCHEMES:
            art = work / f"{name}_{label.replace('/', '_')}"
            if not (art / "manifest.json").exists():
                res = CliRunner().invoke(cli, ["compile", str(model_path(name)), "-t", "cpu", "-o", str(art),
                                               "--no-generation"] + options)     # run() only
                if res.exit_code != 0:
                    print(f"| {name} | {label} | compile failed: {res.output.strip().splitlines()[-1][:100]} | | | |")
                    continue
            sess = session.load(art, "cpu")
            if base is None:                      # f32: the reference logits and greedy continuation
                base = _logits(sess, probe)
                f32_weights = safetensors.load(art / "weights.safetensors")
                table = next(n for n, a in f32_weights.items() if a.ndim == 2 and a.shape[0] == vocab)  # [vocab, H]
                ids = token_ids(PROMPT, vocab=vocab)["input_ids"]
                for _ in range(NEW):
                    ids = np.concatenate([ids, [[int(np.argmax(_logits(sess, ids)[-1]))]]], axis=1)
                greedy = ids
            err = float(np.abs(_logits(sess, probe) - base).max() / np.abs(base).max())
            picks = np.argmax(_logits(sess, greedy[:, :-1])[PROMPT - 1:], axis=-1)
            agree = int(np.sum(picks == greedy[0, PROMPT:]))
            size = (art / "weights.safetensors").stat().st_size
            ours, theirs = _converted_bytes(art, f32_weights)
            print(f"| {name} | {label} | {err:.2e} | {agree}/{NEW} | {size:,} | {_table_bytes(art, table):,} | "
                  f"{ours:,} ({theirs:,}) |", flush=True)


if __name__ == "__main__":
    main()

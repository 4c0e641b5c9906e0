"""Every corpus model quantized by ONNX Runtime's MatMulNBitsQuantizer (int4; block 32 asymmetric, block 128
symmetric), compiled for polyport cpu and compared with ONNX Runtime running the same quantized file.

    PYTHONPATH=... python benchmarks/quant_corpus.py [--models llama_a ...] [--work-dir DIR]

Prints one row per model and block: MatMuls the quantizer turned into MatMulNBits and the ones it left
(a batched expert MatMul or a MatMul over an activation), and max |polyport - ORT| / max |ORT logit| at
seq 1 and 12 (the project's fp32 tolerance is 1e-4).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

import numpy as np


def main() -> None:
    from polyport.compiler import compile_model
    from polyport.runtime import session
    from polyport.tests.quant_models import count_ops, matmul_nbits
    from polyport.tests.real_models import corpus, ort_run, token_ids

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=sorted(corpus()))
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    work = pathlib.Path(args.work_dir or os.path.join(tempfile.gettempdir(), "polyport_quant_corpus"))
    work.mkdir(parents=True, exist_ok=True)
    print("| model | block | MatMulNBits | MatMul left | err seq 1 | err seq 12 | within 1e-4 |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        vocab = int(corpus()[name]["hf_config"]["vocab_size"])
        for block, sym in ((32, False), (128, True)):
            path = matmul_nbits(name, block, sym, work)
            row = f"| {name} | {block}{' sym' if sym else ''} | {count_ops(path, 'MatMulNBits')} | " \
                  f"{count_ops(path, 'MatMul')} |"
            try:
                sess = session.load(compile_model(path, ["cpu"], work / f"{path.stem}_art"), "cpu")
            except Exception as e:  # noqa: BLE001 - a row per model, whatever fails
                print(f"{row} {type(e).__name__}: {str(e).splitlines()[0][:120]} | | no |", flush=True)
                continue
            errs = []
            for seq in (1, 12):
                feeds = token_ids(seq, vocab=vocab)
                want = ort_run(path, feeds)[0]
                got = sess.run(feeds)[sess.output_names[0]]
                errs.append(float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()))
            print(f"{row} {errs[0]:.2e} | {errs[1]:.2e} | {'yes' if max(errs) <= 1e-4 else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

"""Shared by the generation tests: one reference generator and one ORT session per model, per test run."""
from __future__ import annotations

import functools

import numpy as np

from polyport.tests.real_models import BUNDLED, MODELS, assert_logits_close


def path_of(name: str):
    return BUNDLED if name == "deepseek_v3_tiny" else MODELS / f"{name}.onnx"


@functools.lru_cache(maxsize=None)
def generator(name: str):
    from polyport.compiler import reference_generator
    return reference_generator(path_of(name))


@functools.lru_cache(maxsize=None)
def _ort(name: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path_of(name)), so, providers=["CPUExecutionProvider"])


def ort_logits(name: str, ids: np.ndarray) -> np.ndarray:
    """ONNX Runtime's full cache-less forward: logits [1, seq, vocab] of every position."""
    return _ort(name).run(None, {"input_ids": np.asarray(ids, np.int64).reshape(1, -1)})[0]


def prompt(name: str, n: int, extra: int = 0, seed: int = 0) -> np.ndarray:
    vocab = generator(name).generation["vocab"]
    return np.random.default_rng(seed + n).integers(0, vocab, size=(1, n + extra), dtype=np.int64)


def assert_unequal_prompts_batch_like_alone(s, name: str, lengths=(3, 9, 17), steps: int = 6) -> np.ndarray:
    """`s.generate` over a right-padded batch of prompts of `lengths` equals each prompt generated
    alone; returns the ids and the tokens generated alone."""
    ids = np.zeros((len(lengths), max(lengths)), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = prompt(name, n)[0]
    together = s.generate(ids, steps, lengths=list(lengths))
    alone = np.stack([s.generate(ids[b:b + 1, :n], steps)[0] for b, n in enumerate(lengths)])
    np.testing.assert_array_equal(together, alone)
    return ids, alone


def assert_decodes_like(s, ids: np.ndarray, n: int, want: np.ndarray):
    """Teacher-forced: `s.start` on the first n ids, then the later ids appended one at a time (all but
    the last, whose logits no row of `want` covers past the prompt's seq); every last-position logits row
    equals `want` (full-forward logits [seq, vocab]) at that position. Returns the generation state."""
    state = s.start(ids[:, :n])
    assert_logits_close(state.logits[0], want[n - 1])
    for t in range(ids.shape[1] - n - 1):
        assert_logits_close(state.append(ids[:, n + t])[0], want[n + t])
    return state


def quantized_graph(name: str, quantization):
    """The fused graph of `name` with its weights quantized as `compile --quantize` does."""
    from polyport.frontend.onnx_import import import_onnx
    from polyport.passes.pipelines import run_pipeline
    from polyport.passes.quantize_weights import quantize_weights
    g = import_onnx(path_of(name))
    run_pipeline(g)
    quantize_weights(g, quantization)
    return g

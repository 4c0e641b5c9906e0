"""The real-model corpus (examples/models, made by examples/export_hf.py) and how tests compare with ORT."""
from __future__ import annotations

import json
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
MODELS = EXAMPLES / "models"
BUNDLED = EXAMPLES / "deepseek_v3_tiny.onnx"


def corpus() -> dict[str, dict]:
    """name -> corpus.json entry (family, config, layer counts, ...)."""
    return json.loads((MODELS / "corpus.json").read_text())["models"]


def model_path(name: str) -> pathlib.Path:
    return MODELS / f"{name}.onnx"


def token_ids(seq: int, vocab: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + seq)
    return {"input_ids": rng.integers(0, vocab, size=(1, seq), dtype=np.int64)}


def ort_run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort
    data = model if isinstance(model, bytes) else (model.SerializeToString() if hasattr(model, "SerializeToString")
                                                    else pathlib.Path(model).read_bytes())
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_logits_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    """max |got - want| <= rel * max |want|: the project's tolerance for fp32 logits."""
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.abs(want).max())
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x max|logit| {scale:.3g}"

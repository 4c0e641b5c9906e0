"""The ascend ONNX models' weights, stored once for all of them.

model.onnx, prefill.onnx and decode.onnx use the same fp16 weights: each large initializer is ONNX
external data (location / offset / length) into one `weights.bin` beside them, each distinct tensor
written once, so the derived programs add no weight bytes. `onnx.load` (and ATC, which reads ONNX
external data from the model's folder) follows the references.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto

WEIGHTS_FILE = "weights.bin"
MIN_BYTES = 1024              # smaller initializers (shapes, scalars) stay inside their model
ALIGN = 64


def save_sharing_weights(models: list[tuple[str, onnx.ModelProto]], out_dir: Path) -> list[str]:
    """Save each (stem, model) as `{stem}.onnx` with its large initializers in one shared file; the files."""
    stored: dict[bytes, tuple[int, int]] = {}
    offset = 0
    with open(Path(out_dir) / WEIGHTS_FILE, "wb") as f:
        for stem, model in models:
            for t in model.graph.initializer:
                if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) < MIN_BYTES:
                    continue
                key = hashlib.sha256(t.raw_data).digest()
                if key not in stored:
                    f.write(b"\0" * (-offset % ALIGN))
                    offset += -offset % ALIGN
                    f.write(t.raw_data)
                    stored[key] = (offset, len(t.raw_data))
                    offset += len(t.raw_data)
                at, length = stored[key]
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(at)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save(model, str(Path(out_dir) / f"{stem}.onnx"))
    return [f"{stem}.onnx" for stem, _ in models] + [WEIGHTS_FILE]

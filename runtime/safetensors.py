"""The safetensors format, read memory-mapped and written without a copy per tensor.

Layout: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}} (offsets relative to the end of the header), then
the raw little-endian bytes. bf16 and fp8 go through ml_dtypes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_ALIGN = 64   # tensors start on 64-byte boundaries, so memory-mapped arrays are aligned for SIMD loads


class SafetensorsError(ValueError):
    pass


def save(tensors: Mapping[str, np.ndarray], f: BinaryIO, metadata: Mapping[str, str] | None = None) -> None:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        offset = -(-offset // _ALIGN) * _ALIGN
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        arrays[name] = (offset, arr)
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    pos = 0
    for name, (begin, arr) in arrays.items():
        f.write(b"\0" * (begin - pos))
        f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        pos = begin + arr.nbytes


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only arrays by name."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header of {n} bytes does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: unreadable header ({e})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if base + end > size or end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(f"{path}: tensor {name!r} runs past the end of the file or has a wrong size")
        if end == begin:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + begin, shape=shape)
    return out

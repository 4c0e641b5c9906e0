"""External-data tensors, memory-mapped instead of read."""
from __future__ import annotations

import os

import numpy as np
from onnx import TensorProto, numpy_helper

from .. import errors
from . import dtypes


def mmap_external(t: TensorProto, base_dir: str | None) -> np.ndarray:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location")
    if not location:
        raise errors.ImportError_(f"tensor {t.name!r} uses external data but names no location")
    path = os.path.join(base_dir or ".", location)
    if not os.path.isfile(path):
        raise errors.ImportError_(f"external data file {path!r} for tensor {t.name!r} is missing")
    dt = dtypes.from_onnx(t.data_type)
    shape = tuple(t.dims)
    count = int(np.prod(shape, dtype=np.int64))
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else None
    if dt.itemsize_bits % 8 or dt.numpy is None or dt.name == "str":
        # Packed 4-bit and string tensors: decode through onnx (copies; rare for weights).
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(length if length is not None else -1)
        tmp = TensorProto()
        tmp.CopyFrom(t)
        del tmp.external_data[:]
        tmp.data_location = TensorProto.DEFAULT
        tmp.raw_data = raw
        return numpy_helper.to_array(tmp)
    need = count * dt.itemsize_bits // 8
    size = os.path.getsize(path)
    if offset + need > size or (length is not None and length < need):
        raise errors.ImportError_(
            f"external data file {path!r} is truncated: tensor {t.name!r} needs {need} bytes at offset "
            f"{offset}, the file has {size} bytes")
    if count == 0:
        return np.zeros(shape, dt.numpy)
    return np.memmap(path, dtype=dt.numpy, mode="r", offset=offset, shape=shape)

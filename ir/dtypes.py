"""Element types of the IR and their NumPy / ONNX counterparts.

One table, `DTYPES`, is the single source of truth; everything else is a
lookup into it. bf16 and fp8 map to `ml_dtypes` NumPy types.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
from onnx import TensorProto


@dataclasses.dataclass(frozen=True)
class DType:
    name: str              # the IR's spelling: f32, bf16, i64, ...
    onnx: int              # TensorProto.DataType
    numpy: np.dtype | None  # None where NumPy has no counterpart (strings are object)
    itemsize_bits: int

    def __str__(self) -> str:
        return self.name

    @property
    def is_float(self) -> bool:
        return self.name.startswith(("f", "bf"))

    @property
    def is_integer(self) -> bool:
        return self.name.startswith(("i", "u"))


def _dt(name, onnx_type, np_type, bits):
    return DType(name, onnx_type, None if np_type is None else np.dtype(np_type), bits)


DTYPES: tuple[DType, ...] = (
    _dt("f32", TensorProto.FLOAT, np.float32, 32),
    _dt("f16", TensorProto.FLOAT16, np.float16, 16),
    _dt("bf16", TensorProto.BFLOAT16, ml_dtypes.bfloat16, 16),
    _dt("f64", TensorProto.DOUBLE, np.float64, 64),
    _dt("f8e4m3", TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, 8),
    _dt("f8e4m3fnuz", TensorProto.FLOAT8E4M3FNUZ, ml_dtypes.float8_e4m3fnuz, 8),
    _dt("f8e5m2", TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2, 8),
    _dt("f8e5m2fnuz", TensorProto.FLOAT8E5M2FNUZ, ml_dtypes.float8_e5m2fnuz, 8),
    _dt("f8e8m0", TensorProto.FLOAT8E8M0, ml_dtypes.float8_e8m0fnu, 8),
    _dt("f6e2m3", TensorProto.FLOAT6E2M3, ml_dtypes.float6_e2m3fn, 6),
    _dt("f6e3m2", TensorProto.FLOAT6E3M2, ml_dtypes.float6_e3m2fn, 6),
    _dt("f4e2m1", TensorProto.FLOAT4E2M1, ml_dtypes.float4_e2m1fn, 4),
    _dt("i64", TensorProto.INT64, np.int64, 64),
    _dt("i32", TensorProto.INT32, np.int32, 32),
    _dt("i16", TensorProto.INT16, np.int16, 16),
    _dt("i8", TensorProto.INT8, np.int8, 8),
    _dt("i4", TensorProto.INT4, ml_dtypes.int4, 4),
    _dt("i2", TensorProto.INT2, ml_dtypes.int2, 2),
    _dt("u64", TensorProto.UINT64, np.uint64, 64),
    _dt("u32", TensorProto.UINT32, np.uint32, 32),
    _dt("u16", TensorProto.UINT16, np.uint16, 16),
    _dt("u8", TensorProto.UINT8, np.uint8, 8),
    _dt("u4", TensorProto.UINT4, ml_dtypes.uint4, 4),
    _dt("u2", TensorProto.UINT2, ml_dtypes.uint2, 2),
    _dt("bool", TensorProto.BOOL, np.bool_, 8),
    _dt("c64", TensorProto.COMPLEX64, np.complex64, 64),
    _dt("c128", TensorProto.COMPLEX128, np.complex128, 128),
    _dt("str", TensorProto.STRING, np.object_, 0),
)

_BY_NAME = {d.name: d for d in DTYPES}
_BY_ONNX = {d.onnx: d for d in DTYPES}
_BY_NUMPY = {d.numpy: d for d in DTYPES if d.numpy is not None and d.name != "str"}
_BY_NUMPY[np.dtype(np.object_)] = _BY_NAME["str"]
_BY_NUMPY[np.dtype(np.str_)] = _BY_NAME["str"]

F32, F16, BF16, I64, I32, BOOL = (_BY_NAME[n] for n in ("f32", "f16", "bf16", "i64", "i32", "bool"))


class UnknownDType(ValueError):
    pass


def from_name(name: str) -> DType:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownDType(f"unknown dtype {name!r}; known: {', '.join(_BY_NAME)}") from None


def from_onnx(code: int) -> DType:
    try:
        return _BY_ONNX[code]
    except KeyError:
        name = TensorProto.DataType.Name(code) if code in TensorProto.DataType.values() else str(code)
        raise UnknownDType(f"unsupported ONNX element type {name}") from None


def from_numpy(dtype) -> DType:
    dtype = np.dtype(dtype)
    if dtype.kind == "U":
        return _BY_NAME["str"]
    try:
        return _BY_NUMPY[dtype]
    except KeyError:
        raise UnknownDType(f"unsupported NumPy dtype {dtype}") from None

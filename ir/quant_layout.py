"""Weights in QuantMatMul's layout (ir/fused/quant.py), from what quantized models store and from f32.

Every conversion moves codes, never dequantized floats: an imported or compiled quantized
weight stays as small in the artifact as it was in the model.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import ml_dtypes
import numpy as np


@dataclasses.dataclass
class QuantWeight:
    """One weight in QuantMatMul's layout, with the attributes the op carries."""
    qweight: np.ndarray
    scales: Optional[np.ndarray]    # [N, KB] float32; None for 16-bit weights
    zeros: Optional[np.ndarray]     # [N, KB] float32, or None (the format's default zero)
    K: int
    N: int
    bits: int
    block_size: int
    format: str

    @property
    def attrs(self) -> dict:
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block_size, "format": self.format}


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """[N, K] integer codes (0..15 or -8..7) -> uint8 [N, ceil(K/2)], even k in the low nibble."""
    c = np.asarray(codes).astype(np.int16) & 15
    if c.shape[1] % 2:
        c = np.concatenate([c, np.zeros((c.shape[0], 1), c.dtype)], axis=1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(b: np.ndarray, count: int) -> np.ndarray:
    """uint8 [R, C] -> [R, count] unsigned nibbles, low nibble first."""
    b = np.asarray(b, dtype=np.uint8)
    return np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1)[:, :count]


# ---- ONNX Runtime's MatMulNBits ------------------------------------------------------------------
def from_matmul_nbits(b: np.ndarray, scales: np.ndarray, zero_points: Optional[np.ndarray], *,
                      K: int, N: int, bits: int, block_size: int) -> QuantWeight:
    """B uint8 [N, KB, block_size * bits / 8], scales [N * KB] or [N, KB], zero points packed
    uint8 (ceil(KB * bits / 8) bytes per row) or absent (zero 2^(bits-1): stored as signed codes)."""
    kb = -(-K // block_size)
    rows = np.asarray(b).reshape(N, -1)
    q = np.ascontiguousarray(rows[:, :-(-K * bits // 8)], dtype=np.uint8)
    s = np.asarray(scales, dtype=np.float32).reshape(N, kb)
    if zero_points is None:     # c - 2^(bits-1) is c with its top bit flipped, read as two's complement:
        q = q ^ np.uint8(0x88 if bits == 4 else 0x80)          # stored signed, the kernels skip the flip
        return QuantWeight(q if bits == 4 else q.view(np.int8), s, None, K, N, bits, block_size, "int")
    zp = np.asarray(zero_points).reshape(N, -1)
    z = (unpack_nibbles(zp, kb) if bits == 4 else zp[:, :kb]).astype(np.float32)
    return QuantWeight(q, s, z, K, N, bits, block_size, "uint")


# ---- DequantizeLinear(W [K, N]) feeding MatMul ------------------------------------------------------
_DQ_FORMATS = {np.dtype(ml_dtypes.int4): (4, "int"), np.dtype(ml_dtypes.uint4): (4, "uint"),
               np.dtype(np.int8): (8, "int"), np.dtype(np.uint8): (8, "uint"),
               np.dtype(ml_dtypes.float8_e4m3fn): (8, "fp8e4m3")}


def dq_format(dtype) -> Optional[tuple[int, str]]:
    """(bits, format) for a DequantizeLinear input dtype QuantMatMul can hold, else None."""
    return _DQ_FORMATS.get(np.dtype(dtype))


def from_dequantize_linear(q: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray],
                           block_size: int, k_axis: int = 0) -> QuantWeight:
    """W = DequantizeLinear(q, scale, zero) with blocks of `block_size` along W's axis `k_axis`:
    W [K, N] with scale / zero [KB, N] (k_axis 0, a MatMul's B) or W [N, K] with [N, KB] (k_axis 1,
    Gemm's B with transB)."""
    bits, fmt = _DQ_FORMATS[np.dtype(q.dtype)]
    if k_axis == 0:
        q, scale = np.asarray(q).T, np.asarray(scale).T
        zero = None if zero is None else np.asarray(zero).T
    n, k = q.shape
    qt = np.ascontiguousarray(q)                                    # [N, K], still codes
    if bits == 4:
        qw = pack_int4(qt.astype(np.int8))
    elif fmt == "fp8e4m3":
        qw = qt.view(np.uint8)
    else:
        qw = qt
    z = None
    if zero is not None and np.any(np.asarray(zero).astype(np.float32) != 0):
        z = np.ascontiguousarray(np.asarray(zero).astype(np.float32))
    if fmt == "uint" and z is None:
        z = np.zeros(np.shape(scale), np.float32)                   # DequantizeLinear's default zero is 0
    return QuantWeight(qw, np.ascontiguousarray(np.asarray(scale, np.float32)), z, k, n, bits, block_size, fmt)


# ---- f32 -> symmetric per-group codes (polyport compile --quantize) ---------------------------------
SCHEMES = ("int8", "int4", "fp8")
FLOAT16 = ("bf16", "f16")
FP8_MAX = 448.0


def to_float16(w: np.ndarray, dtype: str) -> QuantWeight:
    """W [K, N] stored as bf16 (uint16 bit patterns) or f16 [N, K], rounded to nearest even."""
    wt = np.ascontiguousarray(np.asarray(w, dtype=np.float32).T)
    n, k = wt.shape
    q = wt.astype(ml_dtypes.bfloat16).view(np.uint16) if dtype == "bf16" else wt.astype(np.float16)
    return QuantWeight(q, None, None, k, n, 16, k, dtype)


def quantize(w: np.ndarray, scheme: str, group_size: int) -> QuantWeight:
    """Symmetric per-group quantization of a MatMul weight W [K, N]: groups of `group_size` consecutive k
    per output column share one scale (max |w| maps to the code range's end)."""
    wt = np.asarray(w, dtype=np.float32).T                          # [N, K]
    n, k = wt.shape
    kb = -(-k // group_size)
    padded = np.zeros((n, kb * group_size), np.float32)
    padded[:, :k] = wt
    groups = padded.reshape(n, kb, group_size)
    amax = np.abs(groups).max(axis=2)
    top = {"int8": 127.0, "int4": 7.0, "fp8": FP8_MAX}[scheme]
    scales = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    x = groups / scales[:, :, None]
    if scheme == "fp8":
        codes = x.astype(ml_dtypes.float8_e4m3fn).reshape(n, -1)[:, :k]
        return QuantWeight(np.ascontiguousarray(codes).view(np.uint8), scales, None, k, n, 8, group_size, "fp8e4m3")
    codes = np.clip(np.rint(x), -top - 1, top).astype(np.int8).reshape(n, -1)[:, :k]
    if scheme == "int4":
        return QuantWeight(pack_int4(codes), scales, None, k, n, 4, group_size, "int")
    return QuantWeight(np.ascontiguousarray(codes), scales, None, k, n, 8, group_size, "int")


def quantize_experts(w: np.ndarray, scheme: str, group_size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Expert weights [E, K, N] -> (codes [E, K / 2 | K, N], scales [E, KB, N], the MoE's bits / block_size /
    format): each expert quantized as `quantize` does a MatMul weight, kept K-first (ir/fused/moe.py)."""
    per = [quantize(m, scheme, group_size) for m in np.asarray(w)]
    codes = np.stack([np.ascontiguousarray(q.qweight.T) for q in per])
    scales = np.stack([np.ascontiguousarray(q.scales.T) for q in per])
    return codes, scales, {"bits": per[0].bits, "block_size": per[0].block_size, "format": per[0].format}

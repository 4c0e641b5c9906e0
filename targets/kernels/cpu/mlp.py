"""GatedMLP: y = (act(x @ w_gate) * (x @ w_up)) @ w_down, weights [in, out] (TE, scheduled by
schedule_cpu.py); weights the lowering binds pre-packed go through gemm.py instead."""
from __future__ import annotations

import math

from tvm import te, tirx

from . import fastmath


def activation(name: str, g, clamp: float, alpha: float = 1.0):
    if clamp:
        g = tirx.min(g, tirx.const(clamp, "float32"))
    if name == "silu":      # g * sigmoid(alpha g); fastmath.exp vectorises (tirx.exp: libm per lane)
        z = -g if alpha == 1.0 else tirx.const(-alpha, "float32") * g
        return g / (tirx.const(1.0, "float32") + fastmath.exp(z))
    if name == "gelu":
        return tirx.const(0.5, "float32") * g * (tirx.const(1.0, "float32") + tirx.erf(g * tirx.const(1 / math.sqrt(2.0), "float32")))
    if name == "gelu_tanh":
        return tirx.const(0.5, "float32") * g * (tirx.const(1.0, "float32") + tirx.tanh(
            tirx.const(0.7978845608028654, "float32") * (g + tirx.const(0.044715, "float32") * g * g * g)))
    raise ValueError(f"activation {name!r}")


def clamp_up(u, clamp: float, offset: float = 0.0):
    if clamp:
        u = tirx.max(tirx.min(u, tirx.const(clamp, "float32")), tirx.const(-clamp, "float32"))
    return u + tirx.const(offset, "float32") if offset else u


def gate_up(x: te.Tensor, wg: te.Tensor, wu: te.Tensor, act: str, clamp: float):
    """x [M, K] -> h [M, I] = act(x wg) * (x wu)."""
    m, kdim = x.shape
    n = wg.shape[1]
    k1 = te.reduce_axis((0, kdim), name="k")
    g = te.compute((m, n), lambda i, j: te.sum(x[i, k1].astype("float32") * wg[k1, j].astype("float32"), axis=k1),
                   name="gate")
    k2 = te.reduce_axis((0, kdim), name="k")
    u = te.compute((m, n), lambda i, j: te.sum(x[i, k2].astype("float32") * wu[k2, j].astype("float32"), axis=k2),
                   name="up")
    return te.compute((m, n), lambda i, j: (activation(act, g[i, j], clamp) * clamp_up(u[i, j], clamp)).astype(x.dtype),
                      name="gated")


def matmul(x: te.Tensor, w: te.Tensor):
    """x [M, K] @ w [K, N]."""
    m, kdim = x.shape
    n = w.shape[1]
    k = te.reduce_axis((0, kdim), name="k")
    acc = te.compute((m, n), lambda i, j: te.sum(x[i, k].astype("float32") * w[k, j].astype("float32"), axis=k),
                     name="matmul")
    if x.dtype == "float32":
        return acc
    return te.compute((m, n), lambda i, j: acc[i, j].astype(x.dtype), name="matmul_out")   # f32 accumulation


def pack_block(n: int) -> int:
    """The column block NB for packing a [K, N] weight as [N / NB, K, NB] (0: do not pack): two vectors
    of the build CPU (isa.py) where N allows, so gemm.py's tile is 12 x 32 on AVX-512 and 6 x 16 on AVX2
    (twelve accumulators, two weight vectors and a broadcast in AVX2's sixteen registers). A 3 x 32
    tile on AVX2 needs seventeen: a 128-token gated GEMM (K 1536, N 4096) on an AVX2 EPYC ran 30.5 ms
    against 19.0-19.4."""
    from .isa import vector_lanes
    for nb in (2 * vector_lanes(), 16, 8):
        if n % nb == 0:
            return nb
    return 0

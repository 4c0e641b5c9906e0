"""RMSNorm over the last axis, computed in fp32: y = x / sqrt(mean(x^2) + eps) * w.

`rms_norm` is the TE compute the GPU targets schedule (and the cpu target's fallback for a width
no vector divides). `rms_norm_func` is the cpu kernel: TE's compute left unscheduled ran serial and
scalar on LLVM, 0.24 ms per 128 x 1536 norm and 1 ms at 512 rows (2.6% of llama_500m's prefill).
Each row sums its squares in one vector accumulator and then scales in place; rows run in parallel
once the input reaches PARALLEL_MIN_STREAM_BYTES.
"""
from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from ..memo import cached_kernel
from .isa import vector_lanes
from .parallel import PARALLEL_MIN_STREAM_BYTES


def rms_norm(x: te.Tensor, w: te.Tensor, epsilon: float):
    shape = list(x.shape)
    n = shape[-1]
    k = te.reduce_axis((0, n), name="k")

    def sq(*i):
        v = x(*i[:-1], k).astype("float32")
        return te.sum(v * v, axis=k)

    ss = te.compute(shape[:-1] + [1], lambda *i: sq(*i), name="rms_sumsq")

    def out(*i):
        inv = tirx.rsqrt(ss(*i[:-1], 0) / tirx.const(float(int(n)), "float32") + tirx.const(epsilon, "float32"))
        return (x(*i).astype("float32") * inv * w(i[-1]).astype("float32")).astype(x.dtype)

    if not isinstance(n, tirx.IntImm):
        raise ValueError("RMSNorm: the normalised axis must be static")
    return te.compute(shape, out, name="rms_norm")


def vectorizes(n: int) -> bool:
    """Whether rms_norm_func takes rows of n elements (whole vectors)."""
    return n % vector_lanes() == 0


@cached_kernel
def rms_norm_func(n: int, epsilon: float, dtype: str = "float32"):
    """PrimFunc rms_norm(x [M, N], w [N], out [M, N]); N a multiple of the vector width."""
    L = vector_lanes()
    C = n // L
    assert C * L == n, n
    f32 = "float32"
    parallel_rows = max(1, PARALLEL_MIN_STREAM_BYTES // (n * tvm.DataType(dtype).bits // 8))

    @T.macro
    def row(X, W, O, r):
        acc = T.alloc_buffer((L,), f32, scope="local")
        inv = T.alloc_buffer((1,), f32, scope="local")
        for l in T.vectorized(L):
            acc[l] = T.float32(0)
        for c in range(C):
            for l in T.vectorized(L):
                acc[l] = acc[l] + T.Cast(f32, X[r, c * L + l]) * T.Cast(f32, X[r, c * L + l])
        inv[0] = T.float32(0)
        for l in range(L):
            inv[0] = inv[0] + acc[l]
        inv[0] = T.rsqrt(inv[0] / T.float32(n) + T.float32(epsilon))
        for c in range(C):
            for l in T.vectorized(L):
                O[r, c * L + l] = T.Cast(dtype, T.Cast(f32, X[r, c * L + l]) * inv[0] * T.Cast(f32, W[c * L + l]))

    @T.prim_func(private=True)
    def rms_norm(x_h: T.handle, w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        X = T.match_buffer(x_h, (M, n), dtype)
        W = T.match_buffer(w_h, (n,), dtype)
        O = T.match_buffer(o_h, (M, n), dtype)
        if M >= T.int64(parallel_rows):
            for r in T.parallel(M):
                row(X, W, O, r)
        else:
            for r in range(M):
                row(X, W, O, r)
    return rms_norm

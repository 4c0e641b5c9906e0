"""RMSNorm over the last axis, computed in fp32."""
from __future__ import annotations

from tvm import te, tirx


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

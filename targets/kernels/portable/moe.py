"""MoE expert compute: only the chosen experts run, per (token, slot), reading expert e's
weights in place (never copied; quantized experts decoded where they are read). Routing (scores,
group-limited top-k) is emitted as Relax ops by the lowering; this kernel takes the chosen indices and
weights."""
from __future__ import annotations

from tvm import te, tirx

from ..cpu.mlp import activation, clamp_up
from ..quant_codes import value


def expert_weight(wq: te.Tensor, scales, bits: int, block: int, fmt: str):
    """(e, k, n) -> float32 expert weight: a cast, or (quantized experts, ir/fused/moe.py) the code decoded
    where the reduction reads it, times its block's scale."""
    if not bits:
        return lambda e, k, n: wq[e, k, n].astype("float32")

    def read(e, k, n):
        if bits == 4:
            b = wq[e, tirx.floordiv(k, 2), n]
            code = tirx.Select(tirx.floormod(k, 2) == 0, value(b, bits, fmt, centred=True),
                               value(b, bits, fmt, high=True, centred=True))
        else:
            code = value(wq[e, k, n], bits, fmt, centred=True)
        return code * scales[e, tirx.floordiv(k, block), n]
    return read


def moe_experts(x: te.Tensor, idx: te.Tensor, w: te.Tensor, wg: te.Tensor, wu: te.Tensor, wd: te.Tensor,
                bg=None, bu=None, bd=None, sg=None, su=None, sd=None, *, act: str, clamp: float, alpha: float = 1.0,
                up_offset: float = 0.0, bits: int = 0, block: int = 0, fmt: str = "int"):
    """x [T, H], idx [T, K] (int64), w [T, K] (f32), wg/wu [E, H, I], wd [E, I, Ho] (or their codes, with
    scales sg / su / sd), optional biases bg/bu [E, I], bd [E, Ho] (f32, all three or none) -> y [T, Ho]."""
    T, Hd = x.shape
    K = idx.shape[1]
    I = wd.shape[1] * (2 if bits == 4 else 1)
    Ho = wd.shape[2]
    gw, uw, dw = (expert_weight(q, sc, bits, block, fmt) for q, sc in ((wg, sg), (wu, su), (wd, sd)))
    h1 = te.reduce_axis((0, Hd), name="h")
    g = te.compute((T, K, I), lambda t, s, i: te.sum(
        x[t, h1].astype("float32") * gw(idx[t, s], h1, i), axis=h1), name="moe_gate")
    h2 = te.reduce_axis((0, Hd), name="h")
    u = te.compute((T, K, I), lambda t, s, i: te.sum(
        x[t, h2].astype("float32") * uw(idx[t, s], h2, i), axis=h2), name="moe_up")

    def hidden(t, s, i):
        gv, uv = g[t, s, i], u[t, s, i]
        if bg is not None:
            gv, uv = gv + bg[idx[t, s], i], uv + bu[idx[t, s], i]
        return activation(act, gv, clamp, alpha) * clamp_up(uv, clamp, up_offset) * w[t, s].astype("float32")

    hid = te.compute((T, K, I), hidden, name="moe_hidden")
    s_ = te.reduce_axis((0, K), name="s")
    i_ = te.reduce_axis((0, I), name="i")
    y = te.compute((T, Ho), lambda t, o: te.sum(hid[t, s_, i_] * dw(idx[t, s_], i_, o), axis=[s_, i_]),
                   name="moe_out" if bd is None and x.dtype == "float32" else "moe_down")
    if bd is None:
        return y if x.dtype == "float32" else te.compute((T, Ho), lambda t, o: y[t, o].astype(x.dtype),
                                                         name="moe_out")
    s2 = te.reduce_axis((0, K), name="s")
    bias = te.compute((T, Ho), lambda t, o: te.sum(w[t, s2].astype("float32") * bd[idx[t, s2], o], axis=s2),
                      name="moe_down_bias")
    return te.compute((T, Ho), lambda t, o: (y[t, o] + bias[t, o]).astype(x.dtype), name="moe_out")

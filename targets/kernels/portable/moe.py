"""MoE expert compute: only the chosen experts run, per (token, slot), reading expert e's
weights in place (never copied). Routing (scores, group-limited top-k) is emitted as
Relax ops by the lowering; this kernel takes the chosen indices and weights."""
from __future__ import annotations

from tvm import te, tirx

from ..cpu.mlp import activation, clamp_up


def moe_experts(x: te.Tensor, idx: te.Tensor, w: te.Tensor, wg: te.Tensor, wu: te.Tensor, wd: te.Tensor,
                bg=None, bu=None, bd=None, *, act: str, clamp: float, alpha: float = 1.0, up_offset: float = 0.0):
    """x [T, H], idx [T, K] (int64), w [T, K] (f32), wg/wu [E, H, I], wd [E, I, Ho], optional biases
    bg/bu [E, I], bd [E, Ho] (f32, all three or none) -> y [T, Ho]."""
    T, Hd = x.shape
    K = idx.shape[1]
    I = wg.shape[2]
    Ho = wd.shape[2]
    h1 = te.reduce_axis((0, Hd), name="h")
    g = te.compute((T, K, I), lambda t, s, i: te.sum(
        x[t, h1].astype("float32") * wg[idx[t, s], h1, i].astype("float32"), axis=h1), name="moe_gate")
    h2 = te.reduce_axis((0, Hd), name="h")
    u = te.compute((T, K, I), lambda t, s, i: te.sum(
        x[t, h2].astype("float32") * wu[idx[t, s], h2, i].astype("float32"), axis=h2), name="moe_up")

    def hidden(t, s, i):
        gv, uv = g[t, s, i], u[t, s, i]
        if bg is not None:
            gv, uv = gv + bg[idx[t, s], i], uv + bu[idx[t, s], i]
        return activation(act, gv, clamp, alpha) * clamp_up(uv, clamp, up_offset) * w[t, s].astype("float32")

    hid = te.compute((T, K, I), hidden, name="moe_hidden")
    s_ = te.reduce_axis((0, K), name="s")
    i_ = te.reduce_axis((0, I), name="i")
    if bd is None:
        return te.compute((T, Ho), lambda t, o: te.sum(hid[t, s_, i_] * wd[idx[t, s_], i_, o].astype("float32"),
                                                      axis=[s_, i_]).astype(x.dtype), name="moe_out")
    y = te.compute((T, Ho), lambda t, o: te.sum(hid[t, s_, i_] * wd[idx[t, s_], i_, o].astype("float32"),
                                                axis=[s_, i_]), name="moe_down")
    s2 = te.reduce_axis((0, K), name="s")
    bias = te.compute((T, Ho), lambda t, o: te.sum(w[t, s2].astype("float32") * bd[idx[t, s2], o], axis=s2),
                      name="moe_down_bias")
    return te.compute((T, Ho), lambda t, o: (y[t, o] + bias[t, o]).astype(x.dtype), name="moe_out")

"""Attention in BHSD layout: GQA by indexing kv head h // group (K/V never repeated),
causal / sliding-window masks from positions, optional explicit mask, logit soft-capping and
per-head sinks.
A query that sees no key outputs zeros."""
from __future__ import annotations

from tvm import te, tirx

NEG_INF = float("-inf")


def _mask_at(mask: te.Tensor, b, h, i, j):
    idx = [b, h, i, j][4 - len(mask.shape):]
    return mask(*[tirx.const(0, "int64") if (isinstance(d, tirx.IntImm) and int(d) == 1) else x
                  for d, x in zip(mask.shape, idx)])


def attention(q: te.Tensor, k: te.Tensor, v: te.Tensor, mask, sinks, *, num_heads: int, kv_heads: int,
              scale: float, causal: bool, window: int, softcap: float = 0.0):
    B, H, S, D = q.shape
    Skv = k.shape[2]
    Dv = v.shape[3]
    group = num_heads // kv_heads
    ninf = tirx.const(NEG_INF, "float32")
    # K transposed once per call ([B, KV, D, Skv]) so the q.k loop can run contiguously over keys
    kt = te.compute((B, k.shape[1], D, Skv), lambda b, g, c, j: k[b, g, j, c].astype("float32"), name="k_t")
    d = te.reduce_axis((0, D), name="d")
    raw = te.compute((B, H, S, Skv), lambda b, h, i, j: te.sum(
        q[b, h, i, d].astype("float32") * kt[b, h // group, d, j], axis=d), name="qk")

    def masked(b, h, i, j):
        s = raw[b, h, i, j] * tirx.const(scale, "float32")
        if softcap:      # c * tanh(s / c), before any mask
            c = tirx.const(softcap, "float32")
            s = c * tirx.tanh(s / c)
        pos = i + (Skv - S)
        keep = tirx.const(True, "bool")
        if causal:
            keep = tirx.all(keep, j <= pos)
        if window:
            keep = tirx.all(keep, j > pos - window)
        if mask is not None:
            mv = _mask_at(mask, b, h, i, j)
            if mask.dtype == "bool":
                keep = tirx.all(keep, mv)
            else:
                s = s + mv.astype("float32")
        return tirx.if_then_else(keep, s, ninf)

    scores = te.compute((B, H, S, Skv), masked, name="scores")
    j1 = te.reduce_axis((0, Skv), name="j")
    mx = te.compute((B, H, S), lambda b, h, i: te.max(scores[b, h, i, j1], axis=j1), name="rowmax")

    def safe_max(b, h, i):
        m = mx[b, h, i]
        if sinks is not None:
            m = tirx.max(m, sinks[h].astype("float32"))
        return tirx.if_then_else(m == ninf, tirx.const(0.0, "float32"), m)

    m2 = te.compute((B, H, S), safe_max, name="rowmax_safe")
    e = te.compute((B, H, S, Skv), lambda b, h, i, j: tirx.exp(scores[b, h, i, j] - m2[b, h, i]), name="exp")
    j2 = te.reduce_axis((0, Skv), name="j")
    tot = te.compute((B, H, S), lambda b, h, i: te.sum(e[b, h, i, j2], axis=j2), name="rowsum")

    def total(b, h, i):
        t = tot[b, h, i]
        if sinks is not None:
            t = t + tirx.exp(sinks[h].astype("float32") - m2[b, h, i])
        return t

    t2 = te.compute((B, H, S), total, name="rowsum_all")
    j3 = te.reduce_axis((0, Skv), name="j")
    acc = te.compute((B, H, S, Dv), lambda b, h, i, c: te.sum(
        e[b, h, i, j3] * v[b, h // group, j3, c].astype("float32"), axis=j3), name="pv")
    return te.compute((B, H, S, Dv), lambda b, h, i, c: tirx.if_then_else(
        t2[b, h, i] > tirx.const(0.0, "float32"), acc[b, h, i, c] / t2[b, h, i], tirx.const(0.0, "float32"))
        .astype(q.dtype), name="attention")

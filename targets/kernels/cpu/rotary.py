"""Rotary position embedding (half-split or interleaved, partial rotary dims)."""
from __future__ import annotations

from tvm import te, tirx


def _bcast(t: te.Tensor, idx):
    """Index `t` (broadcastable to the indexed shape, right-aligned) at `idx`."""
    r = len(t.shape)
    sub = idx[len(idx) - r:]
    return t(*[tirx.const(0, "int64") if (isinstance(d, tirx.IntImm) and int(d) == 1) else i
               for d, i in zip(t.shape, sub)])


def rotary(x: te.Tensor, cos: te.Tensor, sin: te.Tensor, rotary_dim: int, interleaved: bool):
    shape = list(x.shape)
    d = int(shape[-1])
    rd = rotary_dim or d
    half = rd // 2

    def f(*i):
        j = i[-1]
        lead = list(i[:-1])
        xv = x(*i).astype("float32")
        if interleaved:
            partner = tirx.if_then_else(j % 2 == 0, -x(*lead, tirx.min(j + 1, d - 1)).astype("float32"),
                                        x(*lead, tirx.max(j - 1, 0)).astype("float32"))
        else:
            partner = tirx.if_then_else(j < half, -x(*lead, tirx.min(j + half, d - 1)).astype("float32"),
                                        x(*lead, tirx.max(j - half, 0)).astype("float32"))
        jc = tirx.min(j, rd - 1)
        c = _bcast(cos, lead + [jc]).astype("float32")
        s = _bcast(sin, lead + [jc]).astype("float32")
        rot = xv * c + partner * s
        if rd < d:
            rot = tirx.if_then_else(j < rd, rot, xv)
        return rot.astype(x.dtype)

    return te.compute(shape, f, name="rotary")

"""Rotary position embedding on the last axis of x, with cos/sin computed from positions upstream.

x: [..., seq, head_dim]; cos, sin: broadcastable to [..., seq, rotary_dim], laid
out as Hugging Face computes them (half-split: the rotary_dim/2 frequencies
repeated twice; interleaved: each frequency repeated in place). The first
`rotary_dim` features rotate (0 means all of them); the rest pass through.
"""
import numpy as np

from ..ops import AttrSpec, attrs_of, define, infers, reference
from ._util import f32, like, same_type

define("Rotary", inputs=("x", "cos", "sin"), outputs=("y",),
       attrs={"interleaved": AttrSpec(int, 0, doc="0: rotate halves (x1, x2); 1: rotate pairs (x[2i], x[2i+1])"),
              "rotary_dim": AttrSpec(int, 0, doc="features that rotate; 0: the whole last axis")},
       doc="RoPE: y = x*cos + rotate(x)*sin on the first rotary_dim features.")


@infers("Rotary", domain="polyport")
def _infer(node, ctx):
    return same_type(node)


def rotate(x: np.ndarray, interleaved: bool) -> np.ndarray:
    if interleaved:
        out = np.empty_like(x)
        out[..., 0::2] = -x[..., 1::2]
        out[..., 1::2] = x[..., 0::2]
        return out
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@reference("Rotary", domain="polyport")
def rotary(node, inputs, ctx):
    x, cos, sin = inputs
    xf = f32(x)
    a = attrs_of(node)
    rd = a["rotary_dim"] or x.shape[-1]
    rot, rest = xf[..., :rd], xf[..., rd:]
    y = rot * f32(cos) + rotate(rot, bool(a["interleaved"])) * f32(sin)
    if rest.shape[-1]:
        y = np.concatenate([y, np.broadcast_to(rest, y.shape[:-1] + rest.shape[-1:])], axis=-1)
    return [like(y, x)]

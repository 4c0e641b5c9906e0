"""Attention: out = softmax(q @ k^T * scale + mask) @ v, per head, in BHSD layout.

q: [B, num_heads, S, Dqk]; k: [B, kv_heads, Skv, Dqk]; v: [B, kv_heads, Skv, Dv]
(Dqk may differ from Dv: DeepSeek-V3 MLA after its up-projections). Query head
h reads kv head h // (num_heads / kv_heads): MHA, GQA and MQA without repeating
K/V. Query i sits at position i + Skv - S (a KV cache precedes it); with
`causal` it sees keys j <= that position, with `window` > 0 only the last
`window` of them (sliding window). `mask` is additive (float) or a keep-mask
(bool), broadcast to [B, num_heads, S, Skv]. With `softcap` c > 0 the scaled
scores are soft-capped, c * tanh(s / c), before any mask applies (Gemma 2). `sinks` ([num_heads]) adds one
per-head logit to each softmax denominator that attends to nothing
(attention sinks, DeepSeek-V4 / gpt-oss). A query that may see no key at all
outputs zeros (as the ONNX Attention errata specify), never NaN.
"""
import numpy as np

from ... import errors
from ..ops import AttrSpec, attrs_of, define, infers, reference
from ..types import TensorType
from ._util import f32, like

define("Attention", inputs=("q", "k", "v", "mask?", "sinks?"), outputs=("out",),
       attrs={"num_heads": AttrSpec(int), "kv_heads": AttrSpec(int),
              "scale": AttrSpec(float, doc="multiplies q @ k^T"),
              "causal": AttrSpec(int, 0), "window": AttrSpec(int, 0, doc="sliding window; 0: unlimited"),
              "softcap": AttrSpec(float, 0.0, doc="c * tanh(scores / c) before masking; 0: none")},
       doc="Scaled dot-product attention with GQA, causal/window masks, explicit masks, softcap and sinks.")


@infers("Attention", domain="polyport")
def _infer(node, ctx):
    q, k, v = (i.type for i in node.inputs[:3])
    h, kvh = node.attrs["num_heads"], node.attrs["kv_heads"]
    if h % kvh:
        raise errors.PolyportError(f"node {node.name} (polyport::Attention): num_heads {h} is not a multiple "
                                   f"of kv_heads {kvh}")
    for name, t, want in (("q", q, h), ("k", k, kvh), ("v", v, kvh)):
        if t.shape is not None and (len(t.shape) != 4 or t.shape[1] not in (want, None)):
            raise errors.PolyportError(f"node {node.name} (polyport::Attention): {name} is {t}, expected "
                                       f"[batch, {want}, seq, head_dim]")
    shape = None
    if q.shape is not None and v.shape is not None:
        shape = q.shape[:3] + v.shape[3:]
    return [TensorType(q.dtype, shape)]


def soft_cap(scores: np.ndarray, softcap: float) -> np.ndarray:
    """c * tanh(scores / c) (logit soft-capping, Gemma 2); scores as they are for c == 0."""
    if not softcap:
        return scores
    c = np.float32(softcap)
    return (np.tanh(scores / c) * c).astype(np.float32)


def visible(s: int, skv: int, causal: bool, window: int) -> np.ndarray:
    """[s, skv] bool: which keys each query may see."""
    pos = np.arange(s)[:, None] + (skv - s)
    j = np.arange(skv)[None, :]
    keep = np.ones((s, skv), bool)
    if causal:
        keep &= j <= pos
    if window:
        keep &= j > pos - window
    return keep


@reference("Attention", domain="polyport")
def attention(node, inputs, ctx):
    q, k, v = (f32(x) for x in inputs[:3])
    mask = inputs[3] if len(inputs) > 3 else None
    sinks = inputs[4] if len(inputs) > 4 else None
    a = attrs_of(node)
    group = a["num_heads"] // a["kv_heads"]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = soft_cap(q @ np.swapaxes(k, -1, -2) * np.float32(a["scale"]), a["softcap"])
    s, skv = scores.shape[-2:]
    neg = np.float32(-np.inf)
    scores = np.where(visible(s, skv, bool(a["causal"]), a["window"]), scores, neg)
    if mask is not None:
        scores = np.where(mask, scores, neg) if mask.dtype == np.bool_ else scores + f32(mask)
    if sinks is not None:
        sink = np.broadcast_to(f32(sinks).reshape(1, -1, 1, 1), scores.shape[:-1] + (1,))
        scores = np.concatenate([scores, sink], axis=-1)
    m = np.max(scores, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(scores - m)
    total = np.sum(e, axis=-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)   # a query that sees no key outputs zeros
    if sinks is not None:
        p = p[..., :-1]
    return [like(p @ v, inputs[0])]

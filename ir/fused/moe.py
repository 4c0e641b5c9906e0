"""MoE: route each token to top_k experts, run them as SwiGLU MLPs, combine by the routing weights.

x: [..., H]; router_w: [H, E]; e_bias: [E] (selection only); w_gate, w_up:
[E, H, I]; w_down: [E, I, H]; hash_table: [vocab, top_k] int and token_ids
(x's leading shape) for hash routing, which replaces the top-k selection.

    logits  = x @ router_w
    scores  = softmax | sigmoid | sqrt(softplus) (logits)
    choice  = scores + e_bias                          (selection only)
    n_group > 1: keep the topk_group groups whose best-two choice sum is largest
    idx     = top_k(choice)  or  hash_table[token_ids]
    w       = scores[idx]; renormalize: w /= sum(w); w *= routed_scaling
    y       = sum_k w_k * GatedMLP(x; w_gate[idx_k], w_up[idx_k], w_down[idx_k])

Shared experts are not part of this op: they stay a GatedMLP beside it, whose
output the graph adds (a target may fuse that add).
"""
import numpy as np

from ..ops import AttrSpec, define, infers, reference
from ._util import f32, like, same_type, softmax
from .mlp import gated

define("MoE", inputs=("x", "router_w", "e_bias?", "w_gate", "w_up", "w_down", "hash_table?", "token_ids?"),
       outputs=("y",),
       attrs={"top_k": AttrSpec(int), "scoring": AttrSpec(str, "softmax", doc="softmax | sigmoid | sqrtsoftplus"),
              "n_group": AttrSpec(int, 1), "topk_group": AttrSpec(int, 1),
              "renormalize": AttrSpec(int, 0), "routed_scaling": AttrSpec(float, 1.0),
              "activation": AttrSpec(str, "silu"), "clamp": AttrSpec(float, 0.0)},
       doc="Mixture-of-experts feed-forward with SwiGLU experts.")


@infers("MoE", domain="polyport")
def _infer(node, ctx):
    return same_type(node)


SCORING = {
    "softmax": lambda z: softmax(z, -1),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "sqrtsoftplus": lambda z: np.sqrt(np.logaddexp(0.0, z)),
}


def route(logits: np.ndarray, attrs: dict, e_bias=None, hash_idx=None) -> tuple[np.ndarray, np.ndarray]:
    """(expert indices [T, k], weights [T, k]) for router logits [T, E]."""
    scores = SCORING[attrs.get("scoring", "softmax")](logits).astype(np.float32)
    k = attrs["top_k"]
    if hash_idx is not None:
        idx = hash_idx.astype(np.int64)
    else:
        choice = scores + f32(e_bias) if e_bias is not None else scores
        groups = attrs.get("n_group", 1)
        if groups > 1:
            t, e = choice.shape
            per = choice.reshape(t, groups, e // groups)
            group_score = np.sort(per, axis=-1)[..., -2:].sum(-1)
            keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :attrs.get("topk_group", 1)]
            gmask = np.zeros((t, groups), bool)
            np.put_along_axis(gmask, keep, True, axis=-1)
            choice = np.where(np.repeat(gmask, e // groups, axis=-1), choice, -np.inf)
        idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(scores, idx, axis=-1)
    if attrs.get("renormalize", 0):
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * np.float32(attrs.get("routed_scaling", 1.0))


@reference("MoE", domain="polyport")
def moe(node, inputs, ctx):
    x, router_w, e_bias, wg, wu, wd = inputs[:6]
    hash_table = inputs[6] if len(inputs) > 6 else None
    token_ids = inputs[7] if len(inputs) > 7 else None
    a = node.attrs
    h = x.shape[-1]
    xf = f32(x).reshape(-1, h)
    hash_idx = hash_table[token_ids.reshape(-1)] if hash_table is not None else None
    idx, w = route(xf @ f32(router_w), a, e_bias, hash_idx)
    y = np.zeros_like(xf)
    for e in np.unique(idx):               # group tokens by expert: each expert runs once
        tok, slot = np.nonzero(idx == e)
        hid = gated(xf[tok] @ f32(wg[e]), xf[tok] @ f32(wu[e]), a.get("activation", "silu"), a.get("clamp", 0.0))
        np.add.at(y, tok, (hid @ f32(wd[e])) * w[tok, slot, None])
    return [like(y.reshape(x.shape), x)]

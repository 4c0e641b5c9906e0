"""MoE: route each token to top_k experts, run them as SwiGLU MLPs, combine by the routing weights.

x: [..., H]; router_w: [H, E]; e_bias: [E] (selection only); w_gate, w_up:
[E, H, I]; w_down: [E, I, H]; hash_table: [vocab, top_k] int and token_ids
(x's leading shape) for hash routing, which replaces the top-k selection.

    logits  = x @ router_w
    scores  = softmax | sigmoid | sqrt(softplus) (logits)
    choice  = scores + e_bias                          (selection only)
    n_group > 1: keep the topk_group groups whose best-two choice sum is largest
    idx     = top_k(choice)  or  hash_table[token_ids]  (ids outside [0, vocab): an input error)
    w       = scores[idx]; renormalize: w /= sum(w); w *= routed_scaling
    y       = sum_k w_k * GatedMLP(x; w_gate[idx_k], w_up[idx_k], w_down[idx_k])

Shared experts are not part of this op: they stay a GatedMLP beside it, whose
output the graph adds (a target may fuse that add).

Quantized experts (`bits` 4 or 8, `polyport compile --quantize`): w_gate / w_up / w_down hold codes
in the experts' own layout, K (the reduced axis: H, or I for w_down) first, and each has its scales:
  codes [E, K / 2, N] uint8 (bits 4: byte [e, k2, n] holds k = 2 k2 in its low nibble, 2 k2 + 1 in its
  high one) or [E, K, N] (bits 8), scales [E, ceil(K / block_size), N] float32,
  W[e, k, n] = decode(code) * scale[e, k // block_size, n]
with QuantMatMul's formats (ir/fused/quant.py: `int`, two's complement; `fp8e4m3`), symmetric (no zeros).
"""
import numpy as np

from ... import errors
from ..ops import AttrSpec, attrs_of, define, infers, reference
from ._util import ACTIVATIONS, f32, like, same_type, softmax
from .mlp import gated

SCORING = {
    "softmax": lambda z: softmax(z, -1),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "sqrtsoftplus": lambda z: np.sqrt(np.logaddexp(0.0, z)),
}

define("MoE", inputs=("x", "router_w", "e_bias?", "w_gate", "w_up", "w_down", "hash_table?", "token_ids?",
                      "gate_scales?", "up_scales?", "down_scales?"),
       outputs=("y",),
       attrs={"top_k": AttrSpec(int), "scoring": AttrSpec(str, "softmax", choices=tuple(SCORING)),
              "n_group": AttrSpec(int, 1), "topk_group": AttrSpec(int, 1),
              "renormalize": AttrSpec(int, 0), "routed_scaling": AttrSpec(float, 1.0),
              "activation": AttrSpec(str, "silu", choices=tuple(ACTIVATIONS)), "clamp": AttrSpec(float, 0.0),
              "bits": AttrSpec(int, 0, doc="expert weights: 0 float, 4 | 8 codes with scales"),
              "block_size": AttrSpec(int, 0, doc="consecutive k sharing one scale (quantized experts)"),
              "format": AttrSpec(str, "int", choices=("int", "fp8e4m3"), doc="how a code decodes")},
       doc="Mixture-of-experts feed-forward with SwiGLU experts.")

RENORM_EPS = 1e-20     # keeps renormalisation finite when every selected weight is 0


@infers("MoE", domain="polyport")
def _infer(node, ctx):
    return same_type(node)


def select_top_k(choice: np.ndarray, top_k: int, n_group: int = 1, topk_group: int = 1,
                 group_score: str = "top2") -> np.ndarray:
    """Expert indices [T, top_k] for selection scores [T, E]: within the `topk_group` groups whose score
    (sum of their best two, or their best one with group_score="max") is largest; ties go to the
    lower index."""
    if n_group > 1:
        t, e = choice.shape
        per = choice.reshape(t, n_group, e // n_group)
        gs = np.sort(per, axis=-1)[..., -2:].sum(-1) if group_score == "top2" else per.max(-1)
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, :topk_group]
        gmask = np.zeros((t, n_group), bool)
        np.put_along_axis(gmask, keep, True, axis=-1)
        choice = np.where(np.repeat(gmask, e // n_group, axis=-1), choice, -np.inf)
    return np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]


def hash_select(table: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Expert indices table[token_ids] ([T, top_k]). Ids outside [0, vocab) are an input error
    (compiled targets reject them when checking the feeds: ir/index_inputs.py)."""
    ids = np.asarray(token_ids).reshape(-1).astype(np.int64)
    check_hash_ids("token ids", ids, table.shape[0])
    return np.asarray(table)[ids].astype(np.int64)


def check_hash_ids(what: str, ids: np.ndarray, vocab: int) -> None:
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise errors.InputError(f"{what}: token id {int(bad[0])} is outside the MoE hash table's rows [0, {vocab})")


def routing_weights(scores: np.ndarray, idx: np.ndarray, renormalize: bool, scaling: float,
                    eps: float = RENORM_EPS) -> np.ndarray:
    """The selected experts' weights [T, k]: their scores, renormalised to sum 1 if asked, times `scaling`."""
    w = np.take_along_axis(scores, idx, axis=-1)
    if renormalize:
        w = w / (w.sum(-1, keepdims=True) + np.float32(eps))
    return (w * np.float32(scaling)).astype(np.float32)


def route(logits: np.ndarray, attrs: dict, e_bias=None, hash_table=None,
          token_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(expert indices [T, k], weights [T, k]) for router logits [T, E]; `attrs` as `attrs_of` gives them."""
    scores = SCORING[attrs["scoring"]](f32(logits)).astype(np.float32)
    if hash_table is not None:
        idx = hash_select(hash_table, token_ids)
    else:
        choice = scores + f32(e_bias) if e_bias is not None else scores
        idx = select_top_k(choice, attrs["top_k"], attrs["n_group"], attrs["topk_group"])
    return idx, routing_weights(scores, idx, attrs["renormalize"], attrs["routed_scaling"])


SCALES = (8, 9, 10)           # gate_scales, up_scales, down_scales: the operands of w_gate, w_up, w_down
EXPERT_WEIGHTS = (3, 4, 5)


def quantized(node) -> bool:
    return int(node.attrs.get("bits", 0)) != 0


def expert_weights(codes: np.ndarray, scales: np.ndarray, *, bits: int, block_size: int, format: str,
                   **_) -> np.ndarray:
    """float32 expert weights [E, K, N] from codes [E, K / 2 | K, N] and scales [E, KB, N]."""
    from .quant import dequantize
    k = codes.shape[1] * (2 if bits == 4 else 1)
    return np.stack([dequantize(np.asarray(c).T, np.asarray(sc).T, None, K=k, bits=bits, block_size=block_size,
                                format=format).T for c, sc in zip(codes, scales)])


@reference("MoE", domain="polyport")
def moe(node, inputs, ctx):
    x, router_w, e_bias, wg, wu, wd = inputs[:6]
    hash_table = inputs[6] if len(inputs) > 6 else None
    token_ids = inputs[7] if len(inputs) > 7 else None
    a = attrs_of(node)
    if a["bits"]:
        wg, wu, wd = (expert_weights(w, inputs[i], **a) for w, i in zip((wg, wu, wd), SCALES))
    h = x.shape[-1]
    xf = f32(x).reshape(-1, h)
    idx, w = route(xf @ f32(router_w), a, e_bias, hash_table, token_ids)
    y = np.zeros_like(xf)
    for e in np.unique(idx):               # group tokens by expert: each expert runs once
        tok, slot = np.nonzero(idx == e)
        hid = gated(xf[tok] @ f32(wg[e]), xf[tok] @ f32(wu[e]), a["activation"], a["clamp"])
        np.add.at(y, tok, (hid @ f32(wd[e])) * w[tok, slot, None])
    return [like(y.reshape(x.shape), x)]

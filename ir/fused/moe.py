"""MoE: route each token to top_k experts, run them as SwiGLU MLPs, combine by the routing weights.

x: [..., H]; router_w: [H, E]; e_bias: [E] (selection only); w_gate, w_up:
[E, H, I]; w_down: [E, I, H]; hash_table: [vocab, top_k] int and token_ids
(x's leading shape) for hash routing, which replaces the top-k selection;
gate/up/down_scales (inputs 8-10): quantized experts (below); router_b: [E], b_gate, b_up: [E, I],
b_down: [E, H] (inputs 11-14): biases (gpt-oss), f32 also beside quantized experts.

    logits  = x @ router_w (+ router_b)
    scores  = softmax | sigmoid | sqrt(softplus) (logits)
    choice  = scores + e_bias                          (selection only)
    n_group > 1: keep the topk_group groups whose best-two choice sum is largest
    idx     = top_k(choice)  or  hash_table[token_ids]  (ids outside [0, vocab): an input error)
    w       = scores[idx]; renormalize: w /= sum(w); w *= routed_scaling
    routing "sparsemixer" (PhiMoE, inference form; top_k 2, scores unused): idx_1 = argmax(logits),
              w_1 = its probability in a softmax over the logits within 2 * jitter_eps (relative) of the
              max; idx_2, w_2 the same over the logits with idx_1 removed; w *= routed_scaling
    g, u    = x @ w_gate[e] (+ b_gate[e]), x @ w_up[e] (+ b_up[e])       for e = idx_k
    clamp:    g = min(g, clamp), u = clip(u, -clamp, clamp)
    h       = act(g) * (u + up_offset)        silu with `alpha`: g * sigmoid(alpha * g)
    y       = sum_k w_k * (h @ w_down[e] (+ b_down[e]))

gpt-oss keeps gate and up interleaved in one [E, H, 2I] tensor (gate = columns 0::2):
fuse-moe splits the constant into w_gate / w_up, so the op needs no layout attribute.

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
                     "gate_scales?", "up_scales?", "down_scales?", "router_b?", "b_gate?", "b_up?", "b_down?"),
       outputs=("y",),
       attrs={"top_k": AttrSpec(int), "scoring": AttrSpec(str, "softmax", choices=tuple(SCORING)),
              "n_group": AttrSpec(int, 1), "topk_group": AttrSpec(int, 1),
              "renormalize": AttrSpec(int, 0), "routed_scaling": AttrSpec(float, 1.0),
              "activation": AttrSpec(str, "silu", choices=tuple(ACTIVATIONS)), "clamp": AttrSpec(float, 0.0),
              "alpha": AttrSpec(float, 1.0, doc="silu's sigmoid slope: g * sigmoid(alpha * g)"),
              "up_offset": AttrSpec(float, 0.0, doc="added to the up half before the product"),
              "routing": AttrSpec(str, "topk", choices=("topk", "sparsemixer")),
              "jitter_eps": AttrSpec(float, 0.0, doc="sparsemixer: the relative band kept in each softmax is 2x this"),
              "bits": AttrSpec(int, 0, doc="expert weights: 0 float, 4 | 8 codes with scales"),
              "block_size": AttrSpec(int, 0, doc="consecutive k sharing one scale (quantized experts)"),
              "format": AttrSpec(str, "int", choices=("int", "fp8e4m3"), doc="how a code decodes")},
       doc="Mixture-of-experts feed-forward with SwiGLU experts.")

MOE_INPUTS = ("x", "router_w", "e_bias", "w_gate", "w_up", "w_down", "hash_table", "token_ids", "gate_scales",
              "up_scales", "down_scales", "router_b", "b_gate", "b_up", "b_down")
RENORM_EPS = 1e-20     # keeps renormalisation finite when every selected weight is 0


@infers("MoE", domain="polyport")
def _infer(node, ctx):
    a = attrs_of(node)
    if a["alpha"] != 1.0 and a["activation"] != "silu":
        raise errors.PolyportError(f"node {node.name} (polyport::MoE): alpha {a['alpha']:g} applies to silu only, "
                                   f"not {a['activation']}")
    if a["routing"] == "sparsemixer" and (a["top_k"] != 2 or a["n_group"] != 1 or a["renormalize"]
                                          or any(operand(node.inputs, n) is not None
                                                 for n in ("e_bias", "hash_table"))):
        raise errors.PolyportError(f"node {node.name} (polyport::MoE): sparsemixer routing picks top_k=2 experts "
                                   "with no groups, renormalisation, selection bias or hash table")
    return same_type(node)


def operand(inputs, name: str):
    """MoE's operand `name` from a node's inputs (None where absent)."""
    i = MOE_INPUTS.index(name)
    return inputs[i] if len(inputs) > i else None


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
    if attrs["routing"] == "sparsemixer":
        idx, w = sparsemixer(f32(logits), attrs["jitter_eps"])
        return idx, (w * np.float32(attrs["routed_scaling"])).astype(np.float32)
    scores = SCORING[attrs["scoring"]](f32(logits)).astype(np.float32)
    if hash_table is not None:
        idx = hash_select(hash_table, token_ids)
    else:
        choice = scores + f32(e_bias) if e_bias is not None else scores
        idx = select_top_k(choice, attrs["top_k"], attrs["n_group"], attrs["topk_group"])
    return idx, routing_weights(scores, idx, attrs["renormalize"], attrs["routed_scaling"])


def sparsemixer(logits: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's router at inference (transformers' `sparsemixer`, training=False): (indices [T, 2], weights
    [T, 2]). Each pick is the argmax (ties to the lower expert) of the logits left, weighed by its softmax
    over the logits within 2 * jitter_eps of that max, relative to max(|logit|, max)."""
    z = f32(logits)
    left = z.copy()
    idx = np.zeros(z.shape[:-1] + (2,), np.int64)
    w = np.zeros(z.shape[:-1] + (2,), np.float32)
    rows = np.arange(z.shape[0])
    for k in range(2):
        i = np.argmax(left, axis=-1)
        m = left[rows, i][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):      # 0 / 0 is NaN: not masked, as in torch
            masked = (m - z) / np.maximum(np.abs(z), m) > np.float32(2 * jitter_eps)
        p = softmax(np.where(masked, np.float32(-np.inf), left), -1)
        idx[:, k], w[:, k] = i, p[rows, i]
        left[rows, i] = -np.inf
    return idx, w


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
    hash_table, token_ids, router_b, bg, bu, bd = (operand(inputs, n) for n in MOE_INPUTS[6:8] + MOE_INPUTS[11:])
    a = attrs_of(node)
    if a["bits"]:
        wg, wu, wd = (expert_weights(w, inputs[i], **a) for w, i in zip((wg, wu, wd), SCALES))
    h = x.shape[-1]
    xf = f32(x).reshape(-1, h)
    logits = xf @ f32(router_w)
    if router_b is not None:
        logits = logits + f32(router_b)
    idx, w = route(logits, a, e_bias, hash_table, token_ids)
    y = np.zeros((xf.shape[0], wd.shape[-1]), np.float32)

    def biased(v, b, e):
        return v if b is None else v + f32(b[e])
    for e in np.unique(idx):               # group tokens by expert: each expert runs once
        tok, slot = np.nonzero(idx == e)
        hid = gated(biased(xf[tok] @ f32(wg[e]), bg, e), biased(xf[tok] @ f32(wu[e]), bu, e), a["activation"],
                    a["clamp"], a["alpha"], a["up_offset"])
        np.add.at(y, tok, biased(hid @ f32(wd[e]), bd, e) * w[tok, slot, None])
    return [like(y.reshape(x.shape[:-1] + (wd.shape[-1],)), x)]

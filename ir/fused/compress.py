"""DeepSeek-V4's compressed attention, the token-mixing halves: the KV compressor and the sparse indexer.

A compressed layer (CSA or HCA) attends over its window keys plus compressed entries, one per `rate`
tokens; `Attention` does that attention (K/V = window keys then compressed entries, the mask =
the window's mask then the indexer's). These two ops make the compressed side:

KVCompress(kv [B, S, C], gate [B, S, C], position_bias [rate, C]) -> [B, S // rate, D]
    Entry w pools the `rate` tokens of window w (a trailing partial window is not pooled yet):
        out[w] = sum_j softmax_j(gate_j + position_bias_j) * kv_j        (over the pooled slots j)
    overlap=0 (HCA): C = D, slots = window w's tokens.
    overlap=1 (CSA): C = 2D; slots = window w-1's tokens, first D channels, then window w's tokens,
    last D channels (width 2 x rate, stride rate); window 0 has no previous window (zero weight).
    The RMSNorm and the rotary position (w x rate) of the entries follow as their own ops.

SparseIndexer(q [B, S, H, Dq], k [B, T, Dq], weights [B, S, H], positions [B|1, S]) -> [B, 1, S, T]
    The lightning indexer: score[s, t] = scale * sum_h weights[s, h] * relu(q[s, h] . k[t]). Query s
    (at position p = positions[s]) may see entry t only once its window is complete: t < (p + 1) // rate.
    Of those, the `top_k` highest scores are kept (ties: the lower entry). Output: the additive mask
    of the compressed keys, 0 where kept, -inf elsewhere (concatenated after the window's mask).
"""
import numpy as np

from ..ops import AttrSpec, attrs_of, define, infers, reference
from ..symbolic import floordiv
from ..types import TensorType
from ._util import f32, like, node_error, softmax

define("KVCompress", inputs=("kv", "gate", "position_bias"), outputs=("compressed",),
       attrs={"rate": AttrSpec(int, doc="tokens per compressed entry"),
              "overlap": AttrSpec(int, 0, doc="1: entries also pool the previous window's first half (CSA)")},
       doc="Softmax-gated pooling of each complete window of `rate` tokens into one entry.")

define("SparseIndexer", inputs=("q", "k", "weights", "positions"), outputs=("mask",),
       attrs={"top_k": AttrSpec(int), "rate": AttrSpec(int, doc="tokens per compressed entry"),
              "scale": AttrSpec(float, 1.0, doc="multiplies each head's relu(q . k)")},
       doc="Top-k selection of the complete compressed entries per query, as an additive mask.")


@infers("KVCompress", domain="polyport")
def _infer_compress(node, ctx):
    kv, bias = node.inputs[0].type, node.inputs[2].type
    a = attrs_of(node)
    rate, overlap = a["rate"], a["overlap"]
    if rate < 1:
        raise node_error(node, f"rate {rate} must be at least 1")
    if kv.shape is None:
        return [TensorType(kv.dtype, None)]
    if len(kv.shape) != 3:
        raise node_error(node, f"kv is {kv}, expected [batch, seq, channels]")
    c = kv.shape[2]
    if overlap and isinstance(c, int) and c % 2:
        raise node_error(node, f"overlap needs an even channel count, kv has {c}")
    if bias.shape is not None and isinstance(c, int) and tuple(bias.shape) not in ((rate, c),):
        raise node_error(node, f"position_bias is {bias}, expected [{rate}, {c}]")
    d = c // 2 if overlap and isinstance(c, int) else (None if overlap else c)
    return [TensorType(kv.dtype, (kv.shape[0], floordiv(kv.shape[1], rate), d))]


@infers("SparseIndexer", domain="polyport")
def _infer_indexer(node, ctx):
    q, k = node.inputs[0].type, node.inputs[1].type
    if node.attrs["top_k"] < 1 or node.attrs["rate"] < 1:
        raise node_error(node, "top_k and rate must be at least 1")
    for name, t, rank in (("q", q, 4), ("k", k, 3)):
        if t.shape is not None and len(t.shape) != rank:
            raise node_error(node, f"{name} is {t}, expected rank {rank}")
    shape = None if q.shape is None or k.shape is None else (q.shape[0], 1, q.shape[1], k.shape[1])
    return [TensorType(q.dtype, shape)]


def pool_windows(kv: np.ndarray, gate: np.ndarray, bias: np.ndarray, rate: int, overlap: bool) -> np.ndarray:
    """The pooled entries [B, S // rate, D] of fp32 kv / gate [B, S, C]."""
    b, s, c = kv.shape
    t = s // rate
    kv = kv[:, :t * rate].reshape(b, t, rate, c)
    gate = gate[:, :t * rate].reshape(b, t, rate, c) + bias
    if overlap:
        d = c // 2
        prev_kv = np.zeros((b, t, rate, d), np.float32)
        prev_gate = np.full((b, t, rate, d), -np.inf, np.float32)
        prev_kv[:, 1:], prev_gate[:, 1:] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]    # window 0: zero weight
        kv = np.concatenate([prev_kv, kv[..., d:]], axis=2)
        gate = np.concatenate([prev_gate, gate[..., d:]], axis=2)
    return np.sum(kv * softmax(gate, axis=2), axis=2)


@reference("KVCompress", domain="polyport")
def kv_compress(node, inputs, ctx):
    kv, gate, bias = inputs
    a = attrs_of(node)
    return [like(pool_windows(f32(kv), f32(gate), f32(bias), a["rate"], bool(a["overlap"])), kv)]


def index_scores(q: np.ndarray, k: np.ndarray, weights: np.ndarray, scale: float) -> np.ndarray:
    """[B, S, T]: scale * sum_h weights[s, h] * relu(q[s, h] . k[t])."""
    qk = np.einsum("bshd,btd->bsht", f32(q), f32(k))
    return np.einsum("bsht,bsh->bst", np.maximum(qk, 0.0) * np.float32(scale), f32(weights))


def select_entries(scores: np.ndarray, positions: np.ndarray, top_k: int, rate: int) -> np.ndarray:
    """[B, S, T] bool: the top_k complete entries by score per query (ties: the lower entry)."""
    b, s, t = scores.shape
    ready = (np.broadcast_to(np.asarray(positions, np.int64), (b, s)) + 1) // rate
    valid = np.arange(t)[None, None, :] < ready[..., None]
    order = np.argsort(-np.where(valid, scores, -np.inf), axis=-1, kind="stable")[..., :top_k]
    keep = np.zeros((b, s, t), bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep & valid


@reference("SparseIndexer", domain="polyport")
def sparse_indexer(node, inputs, ctx):
    q, k, weights, positions = inputs
    a = attrs_of(node)
    keep = select_entries(index_scores(q, k, weights, a["scale"]), positions, a["top_k"], a["rate"])
    mask = np.where(keep, np.float32(0.0), np.float32(-np.inf))[:, None]
    return [like(mask, q)]

"""KV-cache ops for generation: append new keys/values to a cache, attend over cache + new rows.

Layout BHSD as in `Attention`: cache [B, KVH, C, D] with C slots (capacity).
Sequence b has past_len[b] tokens before this step; its new row i sits at
position past_len[b] + i. Linear caches (ring=0) keep position p in slot p;
ring caches (ring=1, sliding-window layers) keep it in slot p % C, so only the
last C positions survive and memory is bounded by the window.
"""
import numpy as np

from ..ops import AttrSpec, attrs_of, define, infers, reference
from ..types import TensorType
from ._util import f32, like, node_error
from .attention import soft_cap

define("CacheUpdate", inputs=("cache", "new", "past_len", "n_new"), outputs=("cache_out",),
       attrs={"ring": AttrSpec(int, 0, doc="1: position p lives in slot p % capacity")},
       doc="Write each sequence's first n_new[b] new rows at positions past_len[b].. into the cache.")

define("CachedAttention", inputs=("q", "k_new", "v_new", "cache_k", "cache_v", "past_len", "sinks?"),
       outputs=("out",),
       attrs={"num_heads": AttrSpec(int), "kv_heads": AttrSpec(int),
              "scale": AttrSpec(float, doc="multiplies q @ k^T"),
              "window": AttrSpec(int, 0, doc="sliding window; 0: unlimited"),
              "softcap": AttrSpec(float, 0.0, doc="c * tanh(scores / c) before masking; 0: none"),
              "ring": AttrSpec(int, 0, doc="the caches are rings (position p in slot p % capacity)"),
              "v_in_k": AttrSpec(int, 0, doc="1: V is the first Dv channels of K (shared K=V, absorbed MLA)")},
       doc="Causal attention of k new queries over the cache (before this step's update) and the k new keys.")


@infers("CacheUpdate", domain="polyport")
def _infer_update(node, ctx):
    cache, new = node.inputs[0].type, node.inputs[1].type
    if cache.shape is not None and new.shape is not None and len(cache.shape) == len(new.shape) == 4:
        for axis in (1, 3):
            a, b = cache.shape[axis], new.shape[axis]
            if isinstance(a, int) and isinstance(b, int) and a != b:
                raise node_error(node, f"new rows {new} do not match the cache {cache} on axis {axis}")
    return [cache]


@infers("CachedAttention", domain="polyport")
def _infer_attention(node, ctx):
    q, v = node.inputs[0].type, node.inputs[2].type
    h, kvh = node.attrs["num_heads"], node.attrs["kv_heads"]
    if h % kvh:
        raise node_error(node, f"num_heads {h} is not a multiple of kv_heads {kvh}")
    shape = q.shape[:3] + v.shape[3:] if q.shape is not None and v.shape is not None else None
    return [TensorType(q.dtype, shape)]


def held_positions(past: int, capacity: int, ring: bool) -> np.ndarray:
    """The positions a cache holds before a step whose sequence has `past` tokens."""
    return np.arange(max(0, past - capacity) if ring else 0, past)


def _slots(positions: np.ndarray, capacity: int, ring: bool) -> np.ndarray:
    return positions % capacity if ring else positions


@reference("CacheUpdate", domain="polyport")
def cache_update(node, inputs, ctx):
    cache, new, past_len, n_new = inputs
    ring = bool(attrs_of(node)["ring"])
    out = np.array(cache, copy=True)
    cap = cache.shape[2]
    for b in range(cache.shape[0]):
        past, n = int(past_len[b]), int(n_new[b])
        first = max(0, n - cap) if ring else 0          # a ring keeps the last `cap` rows only
        if not ring and past + n > cap:
            raise node_error(node, f"sequence {b}: {past} cached + {n} new positions exceed the capacity {cap}")
        rows = np.arange(first, n)
        out[b][:, _slots(past + rows, cap, ring)] = new[b][:, rows]
    return [out]


@reference("CachedAttention", domain="polyport")
def cached_attention(node, inputs, ctx):
    q, k_new, v_new, cache_k, cache_v, past_len = (inputs[i] for i in range(6))
    sinks = inputs[6] if len(inputs) > 6 else None
    a = attrs_of(node)
    ring, window = bool(a["ring"]), a["window"]
    group = a["num_heads"] // a["kv_heads"]
    dv = v_new.shape[-1]
    cap, k = cache_k.shape[2], q.shape[2]
    out = np.zeros(q.shape[:3] + (dv,), np.float32)
    for b in range(q.shape[0]):
        past = int(past_len[b])
        held = held_positions(past, cap, ring)
        slots = _slots(held, cap, ring)
        keys = np.concatenate([f32(cache_k[b][:, slots]), f32(k_new[b])], axis=1)      # [KVH, n, Dqk]
        if a["v_in_k"]:
            values = keys[..., :dv]
        else:
            values = np.concatenate([f32(cache_v[b][:, slots]), f32(v_new[b])], axis=1)
        key_pos = np.concatenate([held, past + np.arange(k)])
        query_pos = past + np.arange(k)
        keep = key_pos[None, :] <= query_pos[:, None]
        if window:
            keep &= key_pos[None, :] > query_pos[:, None] - window
        keys, values = np.repeat(keys, group, axis=0), np.repeat(values, group, axis=0)
        scores = soft_cap(f32(q[b]) @ np.swapaxes(keys, -1, -2) * np.float32(a["scale"]), a["softcap"])  # [H, k, n]
        scores = np.where(keep, scores, np.float32(-np.inf))
        if sinks is not None:
            sink = np.broadcast_to(f32(sinks).reshape(-1, 1, 1), scores.shape[:-1] + (1,))
            scores = np.concatenate([scores, sink], axis=-1)
        m = np.max(scores, axis=-1, keepdims=True)
        e = np.exp(scores - np.where(np.isfinite(m), m, 0.0))
        total = np.sum(e, axis=-1, keepdims=True)
        p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
        out[b] = (p[..., :keys.shape[1]] @ values)
    return [like(out, q)]

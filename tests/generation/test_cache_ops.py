"""polyport::CacheUpdate and polyport::CachedAttention references (ir/fused/cache.py).

The oracle for CachedAttention is the plain `polyport::Attention` reference over
the full concatenated K/V of the same positions: decoding against a cache must
mean exactly what attending over the whole sequence means."""
from __future__ import annotations

import numpy as np
import pytest

from polyport import errors
from polyport.ir.fused import attention as attention_op
from polyport.ir.fused import cache as cache_op
from polyport.ir.graph import Node, Value
from polyport.ir.ops import RunContext

CTX = RunContext({})
RNG = np.random.default_rng(0)


def _node(op, **attrs):
    return Node(op, [], [Value("out")], attrs, "polyport", op.lower())


def _update(cache, new, past, n, ring=0):
    return cache_op.cache_update(_node("CacheUpdate", ring=ring), [cache, new, np.array(past, np.int64),
                                                                    np.array(n, np.int64)], CTX)[0]


def _full_attention(q, k, v, *, window=0, sinks=None):
    """Attention of the last q.shape[2] positions over k/v holding every position from 0."""
    node = _node("Attention", num_heads=q.shape[1], kv_heads=k.shape[1], scale=0.3, causal=1, window=window)
    return attention_op.attention(node, [q, k, v, None, sinks] if sinks is not None else [q, k, v], CTX)[0]


def _cached(q, k_new, v_new, ck, cv, past, *, window=0, ring=0, sinks=None, v_in_k=0):
    node = _node("CachedAttention", num_heads=q.shape[1], kv_heads=k_new.shape[1], scale=0.3, window=window,
                 ring=ring, v_in_k=v_in_k)
    ins = [q, k_new, v_new, ck, cv, np.array(past, np.int64)] + ([sinks] if sinks is not None else [])
    return cache_op.cached_attention(node, ins, CTX)[0]


def _randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_linear_update_writes_real_rows_at_each_sequences_length():
    cache = np.zeros((2, 1, 6, 1), np.float32)
    new = np.arange(1, 9, dtype=np.float32).reshape(2, 1, 4, 1)
    out = _update(cache, new, past=[1, 0], n=[2, 4])
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 1, 2, 0, 0, 0])   # padding rows 3, 4 dropped
    np.testing.assert_array_equal(out[1, 0, :, 0], [5, 6, 7, 8, 0, 0])
    assert not cache.any()                                                 # functional: the input is untouched


def test_ring_update_keeps_the_last_capacity_positions_in_slot_p_mod_c():
    cache = np.zeros((1, 1, 3, 1), np.float32)
    new = np.arange(10, 15, dtype=np.float32).reshape(1, 1, 5, 1)       # positions 2..6 (past 2), 4 real
    out = _update(cache, new, past=[2], n=[4], ring=1)
    # real positions 2,3,4,5 -> the ring keeps 3,4,5 in slots 0,1,2; padding row (14) never written
    np.testing.assert_array_equal(out[0, 0, :, 0], [11, 12, 13])


def test_linear_update_past_capacity_is_an_error_naming_the_node():
    with pytest.raises(errors.PolyportError, match="cacheupdate.*capacity 2"):
        _update(np.zeros((1, 1, 2, 1), np.float32), np.zeros((1, 1, 3, 1), np.float32), [0], [3])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])       # MHA, GQA, MQA
@pytest.mark.parametrize("k", [1, 3])
def test_cached_attention_equals_attention_over_the_concatenated_sequence(heads, kv_heads, k):
    past, cap, d, dv = [5, 2], 12, 8, 6
    total = max(past) + k
    K, V = _randn(2, kv_heads, total, d), _randn(2, kv_heads, total, dv)
    q = _randn(2, heads, k, d)
    cache_k, cache_v = np.zeros((2, kv_heads, cap, d), np.float32), np.zeros((2, kv_heads, cap, dv), np.float32)
    for b, p in enumerate(past):
        cache_k[b, :, :p], cache_v[b, :, :p] = K[b, :, :p], V[b, :, :p]
    k_new = np.stack([K[b, :, p:p + k] for b, p in enumerate(past)])
    v_new = np.stack([V[b, :, p:p + k] for b, p in enumerate(past)])
    got = _cached(q, k_new, v_new, cache_k, cache_v, past)
    for b, p in enumerate(past):
        want = _full_attention(q[b:b + 1], K[b:b + 1, :, :p + k], V[b:b + 1, :, :p + k])
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [3, 4])
def test_ring_cache_with_window_equals_windowed_attention_over_everything(window):
    """A ring of `window` slots, filled token by token, after 3 x window tokens."""
    kvh, heads, d, n = 2, 4, 4, 3 * window + 1
    K, V, Q = _randn(1, kvh, n, d), _randn(1, kvh, n, d), _randn(1, heads, n, d)
    ck, cv = np.zeros((1, kvh, window, d), np.float32), np.zeros((1, kvh, window, d), np.float32)
    for t in range(n):
        got = _cached(Q[:, :, t:t + 1], K[:, :, t:t + 1], V[:, :, t:t + 1], ck, cv, [t], window=window, ring=1)
        want = _full_attention(Q[:, :, t:t + 1], K[:, :, :t + 1], V[:, :, :t + 1], window=window)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        ck = _update(ck, K[:, :, t:t + 1], [t], [1], ring=1)
        cv = _update(cv, V[:, :, t:t + 1], [t], [1], ring=1)
    assert ck.shape[2] == window                                            # memory bounded by the window
    np.testing.assert_array_equal(ck[0, :, [(n - window + i) % window for i in range(window)]],
                                  K[0, :, n - window:].transpose(1, 0, 2))


def test_sinks_keep_their_meaning():
    heads, d, past = 2, 4, 5
    K, V, Q = _randn(1, 1, past + 2, d), _randn(1, 1, past + 2, d), _randn(1, heads, 2, d)
    sinks = np.array([0.5, -1.0], np.float32)
    ck, cv = np.zeros((1, 1, 8, d), np.float32), np.zeros((1, 1, 8, d), np.float32)
    ck[:, :, :past], cv[:, :, :past] = K[:, :, :past], V[:, :, :past]
    got = _cached(Q, K[:, :, past:], V[:, :, past:], ck, cv, [past], sinks=sinks, window=4)
    want = _full_attention(Q, K, V, sinks=sinks, window=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_v_in_k_reads_values_from_the_first_channels_of_the_keys():
    d, dv, past = 6, 4, 3
    K, Q = _randn(1, 1, past + 1, d), _randn(1, 2, 1, d)
    ck = np.zeros((1, 1, 5, d), np.float32)
    ck[:, :, :past] = K[:, :, :past]
    garbage = np.full((1, 1, 5, dv), 1e6, np.float32)                    # ignored under v_in_k
    got = _cached(Q, K[:, :, past:], K[:, :, past:, :dv], ck, garbage, [past], v_in_k=1)
    want = _full_attention(Q, K, K[..., :dv].copy())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_prefill_then_decode_with_padding_matches_each_sequence_alone():
    """Prefill right-padded prompts (n_new < k), then decode one token: the cache holds only real rows."""
    kvh, heads, d, cap = 1, 2, 4, 10
    lengths = [2, 5]
    K, V, Q = _randn(2, kvh, 6, d), _randn(2, kvh, 6, d), _randn(2, heads, 6, d)
    ck = _update(np.zeros((2, kvh, cap, d), np.float32), K[:, :, :5], [0, 0], lengths)
    cv = _update(np.zeros((2, kvh, cap, d), np.float32), V[:, :, :5], [0, 0], lengths)
    k_new = np.stack([K[b, :, n:n + 1] for b, n in enumerate(lengths)])
    v_new = np.stack([V[b, :, n:n + 1] for b, n in enumerate(lengths)])
    q_new = np.stack([Q[b, :, n:n + 1] for b, n in enumerate(lengths)])
    got = _cached(q_new, k_new, v_new, ck, cv, lengths)
    for b, n in enumerate(lengths):
        want = _full_attention(q_new[b:b + 1], K[b:b + 1, :, :n + 1], V[b:b + 1, :, :n + 1])
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-5, atol=1e-6)

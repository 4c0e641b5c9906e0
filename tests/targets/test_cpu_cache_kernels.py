"""The cpu target's KV-cache kernels against the IR's references (ir/fused/cache.py).

Decode attention at random runtime shapes (batch, new queries 1..8, capacity, per-row past_len)
for linear and ring caches, windows, sinks, GQA / MQA and v_in_k; the split-cache path that merges
partial softmax states; CacheUpdate in place (linear, ring, padded rows)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

tvm = pytest.importorskip("tvm")

from polyport.ir import fused  # noqa: E402
from polyport.targets.kernels.cpu.cache_update import cache_update_func  # noqa: E402
from polyport.targets.kernels.cpu.cached_attention import cached_attention_func  # noqa: E402

_BUILT: dict = {}
PLACEHOLDER = np.zeros(1, np.float32)

# (num_heads, kv_heads, d, dv, window, ring, v_in_k, sinks): the static configurations drawn from
CONFIGS = [
    (4, 2, 16, 16, 0, 0, 0, 0),       # GQA, linear
    (4, 1, 24, 16, 0, 0, 1, 0),       # MQA, V inside K (absorbed MLA / shared K=V), D not a lane multiple
    (2, 2, 8, 8, 6, 1, 0, 0),         # sliding window over a ring
    (4, 4, 16, 16, 5, 0, 0, 1),       # window over a linear cache, sinks
    (4, 1, 16, 8, 7, 1, 1, 1),        # ring + v_in_k + sinks (DeepSeek V4's shared K=V)
]


def _compiled(key, make):
    if key not in _BUILT:
        f = make()
        mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        _BUILT[key] = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))["main"]
    return _BUILT[key]


def _attend(cfg, q, kn, vn, ck, cv, past, sinks):
    h, kvh, d, dv, window, ring, v_in_k, has_sinks = cfg
    fn = _compiled(("attn",) + cfg, lambda: cached_attention_func(
        num_heads=h, kv_heads=kvh, d=d, dv=dv, scale=d ** -0.5, window=window, ring=bool(ring),
        v_in_k=bool(v_in_k), sinks=bool(has_sinks)))
    out = tvm.runtime.tensor(np.zeros(q.shape[:3] + (dv,), np.float32))
    args = [q, kn, PLACEHOLDER if v_in_k else vn, ck, PLACEHOLDER if v_in_k else cv, past,
            sinks if has_sinks else PLACEHOLDER]
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def _check_attention(cfg, b, k, cap, pasts, seed):
    h, kvh, d, dv, window, ring, v_in_k, has_sinks = cfg
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, k, d), np.float32)
    kn = rng.standard_normal((b, kvh, k, d), np.float32)
    vn = kn[..., :dv].copy() if v_in_k else rng.standard_normal((b, kvh, k, dv), np.float32)
    ck = rng.standard_normal((b, kvh, cap, d), np.float32)
    cv = ck[..., :dv].copy() if v_in_k else rng.standard_normal((b, kvh, cap, dv), np.float32)
    past = np.array(pasts, np.int64)
    sinks = rng.standard_normal(h).astype(np.float32) if has_sinks else None
    want = fused.evaluate("CachedAttention", [q, kn, vn, ck, cv, past] + ([sinks] if has_sinks else []),
                          num_heads=h, kv_heads=kvh, scale=d ** -0.5, window=window, ring=ring, v_in_k=v_in_k)
    got = _attend(cfg, q, kn, vn, ck, cv, past, sinks)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@st.composite
def decode_cases(draw):
    cfg = draw(st.sampled_from(CONFIGS))
    b, k = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    ring = cfg[5]
    cap = cfg[4] if ring else draw(st.integers(k, 70))           # a ring holds exactly the window
    top = 3 * cap if ring else cap - k                           # linear: room for the k new rows
    pasts = draw(st.lists(st.integers(0, top), min_size=b, max_size=b))
    return cfg, b, k, cap, pasts, draw(st.integers(0, 2 ** 16))


@settings(max_examples=8, deadline=None)
@given(decode_cases())
def test_cached_attention_random(case):
    _check_attention(*case)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_cached_attention_each_config(cfg):
    cap = cfg[4] if cfg[5] else 40
    _check_attention(cfg, 2, 3, cap, [0, 2 * cap if cfg[5] else 30], seed=1)


def test_split_cache_merges_partial_states():
    """A long cache over one kv head: the cached range splits across tasks (run in parallel)."""
    cfg = (16, 1, 256, 256, 0, 0, 0, 1)      # past the parallel threshold: 4 and 3 splits
    _check_attention(cfg, 1, 1, 1100, [1090], seed=3)
    _check_attention(cfg, 2, 2, 1100, [1000, 600], seed=4)
    # few MACs, but a cache of over 1 MiB to stream (decode at batch 1): split and parallel too
    _check_attention((2, 2, 64, 64, 0, 0, 0, 0), 1, 1, 1100, [1090], seed=5)


# ---- CacheUpdate -----------------------------------------------------------------------------
def _update(cache, new, past, n_new, ring):
    kvh, d = cache.shape[1], cache.shape[3]
    fn = _compiled(("update", kvh, d, ring), lambda: cache_update_func(kv_heads=kvh, d=d, ring=bool(ring)))
    buf = tvm.runtime.tensor(cache)
    fn(buf, tvm.runtime.tensor(new), tvm.runtime.tensor(past), tvm.runtime.tensor(n_new))
    return buf.numpy()


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_cache_update_random(data):
    ring = data.draw(st.integers(0, 1))
    b, k, cap = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 20)), data.draw(st.integers(1, 24))
    n_new = np.array(data.draw(st.lists(st.integers(0, k), min_size=b, max_size=b)), np.int64)
    past = np.array([data.draw(st.integers(0, 50 if ring else cap - n)) if ring or n <= cap else 0
                     for n in n_new], np.int64)
    if not ring:
        n_new = np.minimum(n_new, cap - past)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    cache = rng.standard_normal((b, 2, cap, 8), np.float32)
    new = rng.standard_normal((b, 2, k, 8), np.float32)
    want = fused.evaluate("CacheUpdate", [cache, new, past, n_new], ring=ring)
    np.testing.assert_array_equal(_update(cache, new, past, n_new, ring), want)


def test_cache_update_writes_in_place_and_only_real_rows():
    cache = np.zeros((2, 1, 6, 8), np.float32)
    new = np.ones((2, 1, 4, 8), np.float32)
    buf = tvm.runtime.tensor(cache)
    fn = _compiled(("update", 1, 8, 0), lambda: cache_update_func(kv_heads=1, d=8, ring=False))
    fn(buf, tvm.runtime.tensor(new), tvm.runtime.tensor(np.array([1, 0], np.int64)),
       tvm.runtime.tensor(np.array([2, 4], np.int64)))
    got = buf.numpy()
    assert got[0, 0, :, 0].tolist() == [0, 1, 1, 0, 0, 0]      # rows 2, 3 of sequence 0 are padding
    assert got[1, 0, :, 0].tolist() == [1, 1, 1, 1, 0, 0]

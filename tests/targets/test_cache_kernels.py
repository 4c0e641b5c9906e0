"""The KV-cache kernels against the IR's references (ir/fused/cache.py), for both kernel sets:
"cpu" (kernels/cpu, hand-scheduled for the cpu target) and "portable" (kernels/portable, the
GPU kernels the cuda/rocm targets build, here with their thread-bound loops serial, built for LLVM).

Decode attention at random runtime shapes (batch, new queries 1..8, capacity, per-row past_len)
for linear and ring caches, windows, sinks, soft-capping, GQA / MQA and v_in_k; the split-cache path
that merges partial softmax states; CacheUpdate in place (linear, ring, padded rows)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

tvm = pytest.importorskip("tvm")

from polyport.ir import fused  # noqa: E402
from polyport.targets.kernels.cpu.cache_update import cache_update_func  # noqa: E402
from polyport.targets.kernels.cpu.cached_attention import cached_attention_func  # noqa: E402
from polyport.targets.kernels.portable import cache_update as portable_update  # noqa: E402
from polyport.targets.kernels.portable import cached_attention as portable_attention  # noqa: E402

_BUILT: dict = {}
PLACEHOLDER = np.zeros(1, np.float32)

# (num_heads, kv_heads, d, dv, window, ring, v_in_k, sinks, softcap): the static configurations drawn from
CONFIGS = [
    (4, 2, 16, 16, 0, 0, 0, 0, 0.0),       # GQA, linear
    (4, 1, 24, 16, 0, 0, 1, 0, 0.0),       # MQA, V inside K (absorbed MLA / shared K=V), D not a lane multiple
    (2, 2, 8, 8, 6, 1, 0, 0, 0.0),         # sliding window over a ring
    (4, 4, 16, 16, 5, 0, 0, 1, 0.0),       # window over a linear cache, sinks
    (4, 1, 16, 8, 7, 1, 1, 1, 0.0),        # ring + v_in_k + sinks (DeepSeek V4's shared K=V)
    (4, 2, 16, 16, 6, 1, 0, 0, 1.5),       # soft-capped scores over a ring (Gemma 2)
    (16, 1, 76, 64, 0, 0, 1, 0, 0.0),      # absorbed MLA's shape: q.k in tiles of 2 rows x 4 keys, D past the lanes,
                                           # P.V in tiles of 2 of 16 rows x 32 of 64 columns
    (16, 2, 16, 16, 9, 1, 0, 0, 0.0),      # 8 rows per kv head over a window of a ring: tiles of keys past a block
]


IMPLS = ("cpu", "portable")


def _compiled(key, make, name="main"):
    """Build the PrimFuncs `make()` returns ({name: func}, or one func named "main") once; `name`'s."""
    if key not in _BUILT:
        funcs = make()
        funcs = funcs if isinstance(funcs, dict) else {"main": funcs}
        mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
        _BUILT[key] = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return _BUILT[key][name]


def _tensors(*arrays):
    return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]


def _attend(impl, cfg, q, kn, vn, ck, cv, past, sinks):
    h, kvh, d, dv, window, ring, v_in_k, has_sinks, softcap = cfg
    out = tvm.runtime.tensor(np.zeros(q.shape[:3] + (dv,), np.float32))
    kv = [PLACEHOLDER if v_in_k else vn, ck, PLACEHOLDER if v_in_k else cv]
    sink = sinks if has_sinks else PLACEHOLDER
    if impl == "cpu":
        fn = _compiled(("attn",) + cfg, lambda: cached_attention_func(
            num_heads=h, kv_heads=kvh, d=d, dv=dv, scale=d ** -0.5, window=window, ring=bool(ring),
            v_in_k=bool(v_in_k), sinks=bool(has_sinks), softcap=softcap))
        fn(*_tensors(q, kn, kv[0], kv[1], kv[2], past, sink), out)
        return out.numpy()
    key = ("portable_attn",) + cfg
    make = lambda: {  # noqa: E731
        "partial": portable_attention.partial_func(num_heads=h, kv_heads=kvh, d=d, dv=dv, scale=d ** -0.5,
                                                   window=window, ring=bool(ring), v_in_k=bool(v_in_k), gpu=False,
                                                   softcap=softcap),
        "merge": portable_attention.merge_func(num_heads=h, kv_heads=kvh, dv=dv, sinks=bool(has_sinks), gpu=False)}
    states = (q.shape[0] * kvh, portable_attention.MAX_SPLITS, q.shape[2], h // kvh)
    pm, pa = _tensors(np.full(states + (2,), np.nan, np.float32), np.full(states + (dv,), np.nan, np.float32))
    _compiled(key, make, "partial")(*_tensors(q, kn, kv[0], kv[1], kv[2], past), pm, pa)
    _compiled(key, make, "merge")(pm, pa, *_tensors(past, sink), out)
    return out.numpy()


def _check_attention(impl, cfg, b, k, cap, pasts, seed):
    h, kvh, d, dv, window, ring, v_in_k, has_sinks, softcap = cfg
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, k, d), np.float32)
    kn = rng.standard_normal((b, kvh, k, d), np.float32)
    vn = kn[..., :dv].copy() if v_in_k else rng.standard_normal((b, kvh, k, dv), np.float32)
    ck = rng.standard_normal((b, kvh, cap, d), np.float32)
    cv = ck[..., :dv].copy() if v_in_k else rng.standard_normal((b, kvh, cap, dv), np.float32)
    past = np.array(pasts, np.int64)
    sinks = rng.standard_normal(h).astype(np.float32) if has_sinks else None
    want = fused.evaluate("CachedAttention", [q, kn, vn, ck, cv, past] + ([sinks] if has_sinks else []),
                          num_heads=h, kv_heads=kvh, scale=d ** -0.5, window=window, ring=ring, v_in_k=v_in_k,
                          softcap=softcap)
    got = _attend(impl, cfg, q, kn, vn, ck, cv, past, sinks)
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


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_attention_random(impl):
    @settings(max_examples=8, deadline=None)
    @given(decode_cases())
    def run(case):
        _check_attention(impl, *case)
    run()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_cached_attention_each_config(impl, cfg):
    cap = cfg[4] if cfg[5] else 40
    _check_attention(impl, cfg, 2, 3, cap, [0, 2 * cap if cfg[5] else 30], seed=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_split_cache_merges_partial_states(impl):
    """A long cache over one kv head: the cached range splits (cpu: across tasks run in parallel;
    portable: one partial state per split, MIN_SPLIT_KEYS apart, then the merge kernel)."""
    cfg = (16, 1, 256, 256, 0, 0, 0, 1, 0.0)      # cpu: past the parallel threshold, 4 and 3 splits; portable: 8, 4
    _check_attention(impl, cfg, 1, 1, 1100, [1090], seed=3)
    _check_attention(impl, cfg, 2, 2, 1100, [1000, 600], seed=4)
    if impl == "portable":                   # more splits than MAX_SPLITS allows: capped, still exact
        assert 3000 // portable_attention.MIN_SPLIT_KEYS > portable_attention.MAX_SPLITS
        _check_attention(impl, (4, 2, 16, 16, 0, 0, 0, 0, 0.0), 1, 1, 3001, [3000], seed=5)
    else:                                    # few MACs, but over 1 MiB of cache to stream: split and parallel too
        _check_attention(impl, (2, 2, 64, 64, 0, 0, 0, 0, 0.0), 1, 1, 1100, [1090], seed=5)


# ---- CacheUpdate -----------------------------------------------------------------------------
def _update_fn(impl, kvh, d, ring):
    if impl == "cpu":
        return _compiled(("update", kvh, d, ring), lambda: cache_update_func(kv_heads=kvh, d=d, ring=bool(ring)))
    return _compiled(("portable_update", kvh, d, ring),
                     lambda: portable_update.cache_update_func(kv_heads=kvh, d=d, ring=bool(ring), gpu=False))


def _update(cache, new, past, n_new, ring, impl):
    fn = _update_fn(impl, cache.shape[1], cache.shape[3], ring)
    buf = tvm.runtime.tensor(cache)
    fn(buf, tvm.runtime.tensor(new), tvm.runtime.tensor(past), tvm.runtime.tensor(n_new))
    return buf.numpy()


@pytest.mark.parametrize("impl", IMPLS)
def test_cache_update_random(impl):
    @settings(max_examples=8, deadline=None)
    @given(st.data())
    def run(data):
        _check_update(impl, data)
    run()


def _check_update(impl, data):
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
    np.testing.assert_array_equal(_update(cache, new, past, n_new, ring, impl), want)


@pytest.mark.parametrize("impl", IMPLS)
def test_cache_update_writes_in_place_and_only_real_rows(impl):
    cache = np.zeros((2, 1, 6, 8), np.float32)
    new = np.ones((2, 1, 4, 8), np.float32)
    buf = tvm.runtime.tensor(cache)
    fn = _update_fn(impl, 1, 8, 0)
    fn(buf, tvm.runtime.tensor(new), tvm.runtime.tensor(np.array([1, 0], np.int64)),
       tvm.runtime.tensor(np.array([2, 4], np.int64)))
    got = buf.numpy()
    assert got[0, 0, :, 0].tolist() == [0, 1, 1, 0, 0, 0]      # rows 2, 3 of sequence 0 are padding
    assert got[1, 0, :, 0].tolist() == [1, 1, 1, 1, 0, 0]

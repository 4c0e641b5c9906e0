"""The cpu target's hand-written kernels, one PrimFunc at a time.

Attention against the IR's reference: causal / sliding window (wider than the sequence too),
decode rows behind a KV cache, GQA / MQA, query tiles of other heights than the host's, sinks, explicit float and bool masks, Dqk != Dv, and
rows that see no key (zeros, never NaN). The packed dense / gate-up GEMMs against NumPy for
token counts around the register tile (whole tiles, tails, one row) and each column block."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from polyport.ir import fused  # noqa: E402
from polyport.targets.kernels.cpu.attention import attention_func  # noqa: E402
from polyport.targets.kernels.cpu.gemm import (MIN_ROWS_SPLIT, TAIL_ROWS, WARM_TILES, dense_packed_func,  # noqa: E402
                                               tile_rows, whole_tiles)
from polyport.targets.kernels.cpu.isa import vector_lanes  # noqa: E402

_BUILT: dict = {}


def _build(func):
    """Compiled for this host's CPU, whose features (isa.py) the kernels built outside a target follow."""
    from polyport.targets.cpu import host_mcpu
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()}))["main"]


def _run(q, k, v, mask=None, sinks=None, rows=0, **attrs):
    key = (q.shape[1], k.shape[1], q.shape[3], v.shape[3], None if mask is None else (mask.shape, str(mask.dtype)),
           sinks is not None, rows, tuple(sorted(attrs.items())))
    if key not in _BUILT:
        f = attention_func(num_heads=q.shape[1], kv_heads=k.shape[1], d=q.shape[3], dv=v.shape[3],
                           scale=attrs["scale"], causal=bool(attrs.get("causal", 0)), window=attrs.get("window", 0),
                           mask_shape=None if mask is None else mask.shape,
                           mask_dtype="float32" if mask is None else str(mask.dtype), sinks=sinks is not None,
                           rows=rows)
        _BUILT[key] = _build(f)
    placeholder = np.zeros(1, np.float32)
    out = tvm.runtime.tensor(np.zeros(q.shape[:3] + v.shape[3:], np.float32))
    args = [q, k, v, placeholder if mask is None else mask, placeholder if sinks is None else sinks]
    _BUILT[key](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def _check(b=1, h=4, kvh=2, s=7, skv=None, d=16, dv=None, mask=None, sinks=None, seed=0, rows=0, **attrs):
    rng = np.random.default_rng(seed)
    skv = skv or s
    dv = dv or d
    q = rng.standard_normal((b, h, s, d), np.float32)
    k = rng.standard_normal((b, kvh, skv, d), np.float32)
    v = rng.standard_normal((b, kvh, skv, dv), np.float32)
    attrs = dict(num_heads=h, kv_heads=kvh, scale=d ** -0.5, **attrs)
    inputs = [q, k, v, mask, sinks]
    while inputs and inputs[-1] is None:
        inputs.pop()
    want = fused.evaluate("Attention", inputs, **attrs)
    got = _run(q, k, v, mask, sinks, rows, **{a: x for a, x in attrs.items() if a not in ("num_heads", "kv_heads")})
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    return got


@pytest.mark.parametrize("s", [1, 5, 32, 33, 100])
def test_causal_gqa(s):
    _check(s=s, causal=1)


@pytest.mark.parametrize("rows", [1, 2, 3])     # the default tile (the host's) runs in every other test
def test_query_tile_rows(rows):
    _check(s=38, causal=1, window=21, dv=32, rows=rows)


def test_no_mask_mha_batch2():
    _check(b=2, h=2, kvh=2, s=40)


@pytest.mark.parametrize("window", [1, 16, 50])
def test_sliding_window(window):         # 50: wider than the sequence
    _check(s=45, causal=1, window=window)


@pytest.mark.parametrize("s,skv", [(1, 1), (1, 70), (3, 70)])
def test_decode_behind_cache(s, skv):
    _check(s=s, skv=skv, causal=1, window=20)
    _check(s=s, skv=skv, causal=1)


def test_sinks_mqa():
    sinks = np.random.default_rng(1).standard_normal(4).astype(np.float32)
    _check(h=4, kvh=1, s=37, d=32, causal=1, window=16, sinks=sinks)


def test_mla_shapes():                   # Dqk != Dv
    _check(h=2, kvh=2, s=35, d=24, dv=16, causal=1)


def test_float_mask_broadcast():
    mask = np.random.default_rng(2).standard_normal((1, 1, 9, 9)).astype(np.float32)
    mask[0, 0, 3, :] = -np.inf                                     # a row that sees nothing
    got = _check(s=9, mask=mask)
    assert not got[:, :, 3].any()


def test_bool_mask_fully_masked_rows():
    mask = np.random.default_rng(3).random((9, 40)) > 0.5
    mask[4] = False
    got = _check(s=9, skv=40, causal=1, mask=mask)
    assert not got[:, :, 4].any()


def test_fully_masked_row_with_sink_is_zero():
    mask = np.ones((6, 6), bool)
    mask[2] = False
    got = _check(s=6, mask=mask, sinks=np.ones(4, np.float32))
    assert not got[:, :, 2].any()


def _pack(w, nb):
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // nb, nb).transpose(1, 0, 2))


@pytest.mark.parametrize("nb,rows", [(32, 0), (16, 0), (8, 0), (32, 3), (16, 6)])    # 0: the host's tile
@pytest.mark.parametrize("gated", [False, True])
def test_packed_gemm(nb, rows, gated):
    rng = np.random.default_rng(nb)
    k, n = 40, 3 * nb
    wg, wu = (rng.standard_normal((k, n), np.float32) for _ in range(2))
    f = _build(dense_packed_func(k, n // nb, nb, gated=gated, act="silu", clamp=0.0, rows=rows))
    mb = rows or tile_rows(nb, vector_lanes())
    # whole tiles (the last WARM_TILES prefetch the next column block), then tail tiles of each TAIL_ROWS
    # height (prefetching where there is no whole tile), then single rows; or a few rows as whole tail-height tiles
    tails = {r + t for r in (0, mb) for t in (*TAIL_ROWS, sum(TAIL_ROWS), sum(TAIL_ROWS) + 3)}
    splits = {MIN_ROWS_SPLIT * mb + r for r in range(mb)}        # where whole_tiles may give a tile to the tails
    short = {t * i for t in TAIL_ROWS for i in range(1, 5)}       # whole tiles of a tail height (decode batches)
    for m in sorted({1, 2, mb - 1, mb, mb + 1, 2 * mb + 3, (WARM_TILES + 1) * mb + 1} | tails | splits | short):
        if m < 1:
            continue
        x = rng.standard_normal((m, k), np.float32)
        out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        ws = [_pack(wg, nb)] + ([_pack(wu, nb)] if gated else [])
        f(*[tvm.runtime.tensor(a) for a in [x] + ws], out)
        g = x @ wg
        want = g / (1 + np.exp(-g)) * (x @ wu) if gated else g
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4, err_msg=f"m={m}")


def test_whole_tiles_leave_the_tail_tiles_what_they_can_take():
    """AVX2's 6-row tiles: 128 rows as 20 x 6 + 2 x 4 (no single rows), 127 as 21 x 6 + 1, and few rows (decode
    batches) untouched; AVX-512's 12-row tiles with 8- and 4-row tails never give one up."""
    def whole(m, mb):
        return int(tvm.sym.Analyzer().simplify(whole_tiles(tvm.tirx.const(m, "int64"), mb)))
    assert [whole(m, 6) for m in (128, 127, 126, 124, 8, 14, 6 * MIN_ROWS_SPLIT + 2)] == \
        [20, 21, 21, 20, 1, 2, MIN_ROWS_SPLIT - 1]
    assert [whole(m, 12) for m in (128, 130, 14)] == [10, 10, 1]


def test_tiles_follow_the_build_cpu():
    """Register tiles come from the mcpu being built for, not the host: AVX-512 names get the wide
    tiles, AVX2 ones the narrow, and an AVX2 build is still correct (run here on whatever x86 this is)."""
    from polyport.targets.kernels.cpu import attention, isa
    assert isa.lanes_of("skylake-avx512") == isa.lanes_of("znver4") == 16
    assert isa.lanes_of("x86-64-v3") == isa.lanes_of("haswell") == 8
    with isa.building_for("x86-64-v3"):
        assert attention.key_block() == 16 and tile_rows(32, isa.vector_lanes()) == 3
        f = dense_packed_func(24, 2, 32, gated=True)
    with isa.building_for("skylake-avx512"):
        assert attention.key_block() == 32 and tile_rows(32, isa.vector_lanes()) == 12
    rng = np.random.default_rng(5)
    x, wg, wu = rng.standard_normal((7, 24), np.float32), *rng.standard_normal((2, 24, 64), np.float32)
    mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
    built = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"}))["main"]
    out = tvm.runtime.tensor(np.zeros((7, 64), np.float32))
    built(*[tvm.runtime.tensor(a) for a in (x, _pack(wg, 32), _pack(wu, 32))], out)
    g = x @ wg
    np.testing.assert_allclose(out.numpy(), g / (1 + np.exp(-g)) * (x @ wu), rtol=1e-4, atol=1e-4)


def test_packed_gemv_of_streaming_weights():
    """Weights of PARALLEL_MIN_STREAM_BYTES or more run the column blocks in parallel at any row count
    (decode's one row is bound by streaming them): one and two rows against NumPy."""
    from polyport.targets.kernels.cpu.parallel import PARALLEL_MIN_STREAM_BYTES
    rng = np.random.default_rng(5)
    k, nb = 512, 32
    n = PARALLEL_MIN_STREAM_BYTES // (4 * k)
    w = rng.standard_normal((k, n), np.float32)
    func = dense_packed_func(k, n // nb, nb)
    script = func.script()
    assert "for blk in T.parallel" in script and "for blk in range" not in script     # no serial copy left
    f = _build(func)
    for m in (1, 2):
        x = rng.standard_normal((m, k), np.float32)
        out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        f(tvm.runtime.tensor(x), tvm.runtime.tensor(_pack(w, nb)), out)
        np.testing.assert_allclose(out.numpy(), x @ w, rtol=1e-4, atol=1e-4, err_msg=f"m={m}")


@pytest.mark.parametrize("h,k,n,nb", [(4, 16, 32, 32), (2, 40, 16, 8)])   # the second: 2 column blocks a head
def test_per_head_packed_gemm(h, k, n, nb):
    """out[b, h] = x[b, h] @ W[h] (MLA's absorbed products), W [H, K, N] packed per head: rows (b, s)
    flattened, against NumPy at one row, whole tiles, tail tiles and single rows past them."""
    from polyport.targets.kernels.cpu.gemm import per_head_packed_func
    rng = np.random.default_rng(k)
    w = rng.standard_normal((h, k, n), np.float32)
    wp = np.ascontiguousarray(np.stack([_pack(wh, nb) for wh in w]))
    f = _build(per_head_packed_func(h, k, n // nb, nb))
    mb = tile_rows(nb, vector_lanes())
    for b, s in [(1, 1), (3, 1), (8, 1), (1, mb + sum(TAIL_ROWS) + 1), (2, mb + 2), (5, 3)]:
        x = rng.standard_normal((b, h, s, k), np.float32)
        out = tvm.runtime.tensor(np.zeros((b, h, s, n), np.float32))
        f(tvm.runtime.tensor(x), tvm.runtime.tensor(wp), out)
        np.testing.assert_allclose(out.numpy(), x @ w, rtol=1e-4, atol=1e-4, err_msg=f"b={b} s={s}")


@pytest.mark.parametrize("n", [32, 1536])
def test_rms_norm_rows(n):
    """The cpu RMSNorm kernel against the IR's reference, serial (few rows) and with rows in parallel
    (past PARALLEL_MIN_STREAM_BYTES), rows of very different scales."""
    from polyport.targets.kernels.cpu.norm import rms_norm_func
    from polyport.targets.kernels.cpu.parallel import PARALLEL_MIN_STREAM_BYTES
    rng = np.random.default_rng(n)
    func = rms_norm_func(n, 1e-5)
    assert "T.parallel" in func.script()
    f = _build(func)
    w = rng.standard_normal(n, np.float32)
    for m in (1, 3, PARALLEL_MIN_STREAM_BYTES // (4 * n) + 1):
        x = rng.standard_normal((m, n), np.float32) * np.logspace(-3, 3, m, dtype=np.float32)[:, None]
        out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        f(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
        want = fused.evaluate("RMSNorm", [x, w], epsilon=1e-5)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=f"m={m}")


@pytest.mark.skipif(not __import__("polyport.targets.kernels.cpu.isa", fromlist=["amx"]).amx(),
                    reason="the host CPU has no AMX tiles")
@pytest.mark.parametrize("gated", [False, True])
def test_amx_tiles_match_float64(gated):
    """From amx.MIN_ROWS rows the packed GEMM runs on AMX tiles through three bf16 parts of each
    operand: as accurate as the FMA tiles against float64, padded row pairs (M % 32) included, and
    below MIN_ROWS the FMA tiles run."""
    from polyport.targets.kernels.cpu import amx
    rng = np.random.default_rng(7)
    k, n = 2 * amx.KB, 96
    wg, wu = (rng.standard_normal((k, n)) for _ in range(2))
    func = dense_packed_func(k, n // 32, 32, gated=gated, act="silu", clamp=0.0)
    assert "tdpbf16ps" in func.script()
    f = _build(func)
    for m in (amx.MIN_ROWS - 1, amx.MIN_ROWS, amx.MIN_ROWS + 1, 100, 3 * amx.ROWS):
        x = rng.standard_normal((m, k)) * np.logspace(-2, 1, m)[:, None]      # rows of different scales
        out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
        ws = [_pack(wg.astype(np.float32), 32)] + ([_pack(wu.astype(np.float32), 32)] if gated else [])
        f(*[tvm.runtime.tensor(a) for a in [x.astype(np.float32)] + ws], out)
        x32, g32 = x.astype(np.float32).astype(np.float64), wg.astype(np.float32).astype(np.float64)
        g = x32 @ g32
        want = g / (1 + np.exp(-g)) * (x32 @ wu.astype(np.float32).astype(np.float64)) if gated else g
        err = np.abs(out.numpy() - want).max(axis=1) / np.abs(want).max(axis=1)
        assert err.max() < 2e-6, (m, err.max())


@pytest.mark.parametrize("m", [1, 7, 128])
def test_batched_matmul_is_scheduled(m):
    """A legalized batched matmul (DeepSeek V4's hyper-connections: [2, S, 64] x [2, 64, 16]) gets
    the GEMM schedule over its batch loop: it ran as TE's scalar loops, 110 us a call at S = 128."""
    from tvm import relax
    from polyport.targets.schedule_cpu import schedule_func
    x = relax.Var("x", relax.TensorType((2, tvm.tirx.Var("s", "int64"), 64), "float32"))
    w = relax.Var("w", relax.TensorType((2, 64, 16), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        bb.emit_func_output(bb.emit(relax.op.matmul(x, w)))
    mod = relax.transform.LegalizeOps()(bb.get())
    (func,) = [f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    scheduled, done = schedule_func(func)
    assert done and "T.vectorized" in scheduled.script()
    f = _build(scheduled)
    rng = np.random.default_rng(m)
    a = rng.standard_normal((2, m, 64), np.float32)
    b = rng.standard_normal((2, 64, 16), np.float32)
    out = tvm.runtime.tensor(np.zeros((2, m, 16), np.float32))
    f(tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_allclose(out.numpy(), a @ b, rtol=1e-5, atol=1e-5)

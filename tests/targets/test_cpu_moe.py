"""The cpu target's fused MoE kernel (targets/kernels/cpu/moe.py) against the MoE reference, on the
routing edge cases the expert grouping must survive: experts with no tokens, every token on one
expert, top_k == E, group-limited top-k, hash routing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from polyport.ir import fused  # noqa: E402
from polyport.ir.quant_layout import quantize_experts  # noqa: E402
from polyport.targets.kernels.cpu import moe  # noqa: E402


def _run(spec: moe.MoeSpec, seq: int, seed: int = 0, bias=None, table=None, tokens=None, x_scale=1.0,
         scheme=None, group=32):
    """The kernel against the reference; with `scheme` (int4 | int8 | fp8) on quantized experts, whose
    reference dequantizes them (so only the summation order differs)."""
    rng = np.random.default_rng(seed)
    H, E, I, Ho = spec.hidden, spec.experts, spec.inter, spec.out
    x = (rng.standard_normal((seq, H)) * x_scale).astype(np.float32)
    rw = (rng.standard_normal((H, E)) * 0.3).astype(np.float32)
    wg, wu = ((rng.standard_normal((E, H, I)) * 0.1).astype(np.float32) for _ in range(2))
    wd = (rng.standard_normal((E, I, Ho)) * 0.1).astype(np.float32)
    bias = np.zeros(E, np.float32) if bias is None else bias
    attrs = dict(top_k=spec.top_k, scoring=spec.scoring, n_group=spec.n_group, topk_group=spec.topk_group,
                 renormalize=int(spec.renormalize), routed_scaling=spec.scaling, activation=spec.act,
                 clamp=spec.clamp)
    scales = [np.zeros(1, np.float32)] * 3
    if scheme:
        (wg, sg, q), (wu, su, _), (wd, sd, _) = (quantize_experts(w, scheme, group) for w in (wg, wu, wd))
        scales = [sg, su, sd]
        attrs.update(q)
        spec = dataclasses.replace(spec, bits=q["bits"], block=q["block_size"], fmt=q["format"])
    if spec.hash_vocab:
        args = [x, rw, table, tokens, wg, wu, wd] + scales
        want = fused.evaluate("MoE", [x, rw, None, wg, wu, wd, table, tokens] + (scales if scheme else []), **attrs)
    else:
        args = [x, rw, bias, wg, wu, wd] + scales
        want = fused.evaluate("MoE", [x, rw, bias, wg, wu, wd] + ([None, None] + scales if scheme else []),
                              **attrs)
    func = moe.moe_func(spec).with_attr("global_symbol", "moe")
    lib = tvm.compile(tvm.IRModule({"moe": func}), target=tvm.target.Target({"kind": "llvm"}))
    y = tvm.runtime.tensor(np.zeros((seq, Ho), np.float32))
    lib["moe"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], y)
    got = y.numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())), np.abs(got - want).max()
    return got


def test_softmax_topk_renormalised_many_lengths():
    spec = moe.MoeSpec(hidden=16, experts=8, top_k=2, inter=8, out=16, renormalize=True)
    for seq in (1, 3, moe.RB, moe.RB + 1, 37):
        _run(spec, seq, seed=seq)


def test_experts_without_tokens():
    # 16 experts, 2 tokens x top-1: most experts get no row at all
    _run(moe.MoeSpec(hidden=16, experts=16, top_k=1, inter=8, out=16), 2)


def test_all_tokens_on_one_expert():
    # the bias steers every token to expert 3 (the bias counts for selection only, not for the weights)
    bias = np.zeros(4, np.float32)
    bias[3] = 100.0
    _run(moe.MoeSpec(hidden=16, experts=4, top_k=1, inter=8, out=16, scoring="sigmoid"), 29, bias=bias)


def test_top_k_equals_experts():
    _run(moe.MoeSpec(hidden=16, experts=4, top_k=4, inter=12, out=16, renormalize=True, scaling=2.0), 21)


def test_group_limited_sigmoid_with_bias():
    spec = moe.MoeSpec(hidden=32, experts=8, top_k=2, inter=16, out=32, scoring="sigmoid", n_group=4,
                       topk_group=2, renormalize=True, scaling=2.5)
    _run(spec, 33, bias=np.linspace(-0.2, 0.2, 8).astype(np.float32))


def test_hash_routing_clamped_activation():
    spec = moe.MoeSpec(hidden=16, experts=8, top_k=2, inter=8, out=16, scoring="sqrtsoftplus",
                       renormalize=True, scaling=1.5, clamp=0.5, hash_vocab=5)
    rng = np.random.default_rng(1)
    table = rng.integers(0, 8, (5, 2)).astype(np.int64)   # entries in [0, E): the importer checks
    tokens = np.array([0, 1, 2, 3, 4, 4, 2, 1, 0], np.int64)  # ids in [0, V): sessions check the feeds
    _run(spec, len(tokens), table=table, tokens=tokens, x_scale=4.0)


def test_streaming_tiles_for_experts_past_the_cache():
    """An expert matrix above STREAM_BYTES takes tile_stream (rows walked in order, only real rows)."""
    spec = moe.MoeSpec(hidden=128, experts=4, top_k=2, inter=(moe.STREAM_BYTES // (128 * 4)) + 8, out=128,
                       scoring="sigmoid", renormalize=True)
    assert spec.hidden * spec.inter * 4 > moe.STREAM_BYTES
    for seq in (1, moe.RB + 1, 13):
        _run(spec, seq, seed=seq)


@pytest.mark.parametrize("scheme,inter", [("int4", 48), pytest.param("int8", 40, marks=pytest.mark.slow),
                                          pytest.param("fp8", (moe.STREAM_BYTES // (64 * 4)) + 8,
                                                       marks=pytest.mark.slow)])
def test_quantized_experts_decoded_in_registers(scheme, inter):
    """Codes + scales read by the kernel (register tiles; fp8 through the streaming tiles) against the
    reference on the dequantized experts."""
    spec = moe.MoeSpec(hidden=64, experts=4, top_k=2, inter=inter, out=64, renormalize=True)
    for seq in (1, moe.RB + 1):
        _run(spec, seq, seed=seq, scheme=scheme)

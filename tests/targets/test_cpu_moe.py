"""The cpu target's fused MoE kernel (targets/kernels/cpu/moe.py) against the MoE reference, on the
routing edge cases the expert grouping must survive: experts with no tokens, every token on one
expert, top_k == E, group-limited top-k, hash routing; gpt-oss's biases and activation on both tile
paths; PhiMoE's sparsemixer routing (with all-zero logits, where the reference divides 0 by 0); f32 experts
bound column-blocked (register tiles)."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from polyport.ir import fused  # noqa: E402
from polyport.ir.quant_layout import quantize_experts  # noqa: E402
from polyport.runtime.cpu_session import _pack  # noqa: E402
from polyport.targets.cpu import host_mcpu  # noqa: E402
from polyport.targets.kernels.cpu import isa, moe  # noqa: E402


@functools.lru_cache(maxsize=None)
def _built(spec: moe.MoeSpec):
    """One build per spec (the token count is symbolic): tests over several lengths share it."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()})
    with target:                          # the kernel's instructions follow the target's (isa.py)
        func = moe.moe_func(spec).with_attr("global_symbol", "moe")
    return tvm.compile(tvm.IRModule({"moe": func}), target=target)


def _run(spec: moe.MoeSpec, seq: int, seed: int = 0, bias=None, table=None, tokens=None, x_scale=1.0,
         scheme=None, group=32, column_block=0):
    """The kernel against the reference; with `scheme` (int4 | int8 | fp8) on quantized experts, whose
    reference dequantizes them (so only the summation order differs)."""
    rng = np.random.default_rng(seed)
    H, E, I, Ho = spec.hidden, spec.experts, spec.inter, spec.out
    x = (rng.standard_normal((seq, H)) * x_scale).astype(np.float32)
    rw = (rng.standard_normal((H, E)) * 0.3).astype(np.float32)
    wg, wu = ((rng.standard_normal((E, H, I)) * 0.1).astype(np.float32) for _ in range(2))
    wd = (rng.standard_normal((E, I, Ho)) * 0.1).astype(np.float32)
    if spec.routing == "sparsemixer" and x_scale == 0:
        rw = np.zeros_like(rw)                                   # every logit 0: the band test is 0 / 0
    bias = np.zeros(E, np.float32) if bias is None else bias
    attrs = dict(top_k=spec.top_k, scoring=spec.scoring, n_group=spec.n_group, topk_group=spec.topk_group,
                 renormalize=int(spec.renormalize), routed_scaling=spec.scaling, activation=spec.act,
                 clamp=spec.clamp, alpha=spec.alpha, up_offset=spec.up_offset, routing=spec.routing,
                 jitter_eps=spec.jitter_eps)
    one = np.zeros(1, np.float32)
    rb = (rng.standard_normal(E) * 0.5).astype(np.float32) if spec.router_bias else None
    bgud = [(rng.standard_normal(shape) * 0.3).astype(np.float32) for shape in ((E, I), (E, I), (E, Ho))] \
        if spec.biases else [None] * 3
    extras = [one if b is None else b for b in [rb] + bgud]
    scales = [one] * 3
    if scheme:
        (wg, sg, q), (wu, su, _), (wd, sd, _) = (quantize_experts(w, scheme, group) for w in (wg, wu, wd))
        scales = [sg, su, sd]
        attrs.update(q)
        spec = dataclasses.replace(spec, bits=q["bits"], block=q["block_size"], fmt=q["format"],
                                   column_block=column_block)
    ref_scales = scales if scheme else [None] * 3
    if spec.hash_vocab:
        args = [x, rw, table, tokens, wg, wu, wd] + extras + scales
        want = fused.evaluate("MoE", [x, rw, None, wg, wu, wd, table, tokens] + ref_scales + [rb] + bgud, **attrs)
    else:
        args = [x, rw, bias, wg, wu, wd] + extras + scales
        want = fused.evaluate("MoE", [x, rw, None if spec.routing == "sparsemixer" else bias, wg, wu, wd, None,
                                      None] + ref_scales + [rb] + bgud, **attrs)
    if column_block:            # the experts (codes and scales) as the loader binds them (runtime/cpu_session.py)
        bound = (3, 4, 5, 10, 11, 12) if scheme else (3, 4, 5)
        args = [_pack(a, column_block) if i in bound else a for i, a in enumerate(args)]
    lib = _built(spec)
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


@pytest.mark.parametrize("stream", [False, True])
def test_gpt_oss_biases_and_activation(stream):
    """Router bias, per-expert gate/up/down biases, g * sigmoid(1.702 g) * (clamp(up) + 1), in registers
    and streamed."""
    inter = (moe.STREAM_BYTES // (64 * 4)) + 8 if stream else 12
    spec = moe.MoeSpec(hidden=64, experts=4, top_k=2, inter=inter, out=64, renormalize=True, clamp=0.5,
                       alpha=1.702, up_offset=1.0, router_bias=True, biases=True)
    _run(spec, 9, x_scale=2.0)


@pytest.mark.parametrize("x_scale", [1.0, 0.0])
def test_sparsemixer_routing(x_scale):
    spec = moe.MoeSpec(hidden=16, experts=8, top_k=2, inter=8, out=16, routing="sparsemixer", jitter_eps=0.3,
                       scaling=1.5)
    for seq in (1, 11):
        _run(spec, seq, seed=seq, x_scale=x_scale)


def test_quantized_gpt_oss_experts():
    """Quantized experts with gpt-oss's biases and activation: codes decoded in registers, biases added."""
    spec = moe.MoeSpec(hidden=64, experts=4, top_k=2, inter=48, out=64, renormalize=True, clamp=0.5,
                       alpha=1.702, up_offset=1.0, router_bias=True, biases=True)
    _run(spec, moe.RB + 1, x_scale=2.0, scheme="int4")


@pytest.mark.parametrize("scheme,inter", [("int4", 48), pytest.param("int8", 40, marks=pytest.mark.slow),
                                          pytest.param("fp8", (moe.STREAM_BYTES // (64 * 4)) + 8,
                                                       marks=pytest.mark.slow)])
def test_quantized_experts_decoded_in_registers(scheme, inter):
    """Codes + scales read by the kernel (register tiles; fp8 through the streaming tiles) against the
    reference on the dequantized experts."""
    spec = moe.MoeSpec(hidden=64, experts=4, top_k=2, inter=inter, out=64, renormalize=True)
    for seq in (1, moe.RB + 1):
        _run(spec, seq, seed=seq, scheme=scheme)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_decode_tiles_as_byte_dot_products(scheme):
    """Where the host has VNNI and VBMI, int4 experts are bound column-blocked and tiles of at most
    BYTE_DOT_ROWS rows (decode) run their GEMVs as byte dot products (int_dot.py); they match the reference
    on the dequantized experts, and longer inputs mix them with the f32 register tiles over the same layout."""
    with tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()}):
        if not isa.byte_dot():
            pytest.skip("the host has no AVX512-VNNI / VBMI")
        bits = int(scheme[3:])
        nb = moe.column_blocked(bits, "int", 32, 64, 64, 48)
        spec = moe.MoeSpec(hidden=64, experts=4, top_k=2, inter=64, out=48, renormalize=True, bits=bits, block=32,
                           column_block=nb)
        assert nb and "vpdpbusd" in moe.moe_func(spec).script()
    spec = dataclasses.replace(spec, bits=0, block=0, column_block=0)         # _run quantizes
    for seq in (1, 2, 9):
        _run(spec, seq, seed=seq, scheme=scheme, column_block=nb)


@pytest.mark.parametrize("biases", [False, True])
def test_packed_f32_experts_register_tiles(biases):
    """f32 experts bound column-blocked ([E, N / NB, K, NB], as the loader packs them) run gemm.py-style register
    tiles: an expert's rows in tiles of MB, then TAIL_ROWS, then single rows, and past PACKED_RB rows a second
    tile; every split matches the reference. The bias puts all tokens on expert 1 (top-1), so one expert gets
    exactly `seq` rows."""
    from polyport.targets.kernels.cpu import gemm, mlp
    with tvm.target.Target({"kind": "llvm", "mcpu": host_mcpu()}):
        nb = mlp.pack_block(64)
        mb = gemm.tile_rows(nb, isa.vector_lanes())
    kw = dict(router_bias=True, biases=True, clamp=0.5, alpha=1.702, up_offset=1.0) if biases else {}
    spec = moe.MoeSpec(hidden=48, experts=4, top_k=1, inter=64, out=64, column_block=nb, **kw)
    bias = np.array([0, 100, 0, 0], np.float32)
    for seq in sorted({1, 2, 3, mb, mb + 1, 2 * mb + 4 + 3, moe.PACKED_RB, moe.PACKED_RB + mb + 5}):
        _run(spec, seq, seed=seq, bias=bias, column_block=nb)
    spread = dataclasses.replace(spec, top_k=2, renormalize=True)          # rows over every expert
    for seq in (1, 5, 37):
        _run(spread, seq, seed=seq, column_block=nb)

"""Every implementation of every fused op against its reference, on random configurations.

Implementations: the cpu target's hand-written kernels ("cpu"), the portable TE kernels the GPU
targets schedule, built here for LLVM ("portable"), and the ascend target's CANN operator chain
run by the emulator ("ascend"). Reference: `ir.fused.evaluate` (ir/fused/*.py).

hypothesis draws each configuration: a static part (head counts and GQA ratio, head dims,
windows, causal, masks, sinks, activations, scoring functions, groups, top-k up to E, hash
tables) and a dynamic part (sequence length, KV-cache length behind the queries, weights,
inputs, biases, token ids). A TVM build depends only on the static part (weights are parameters
or inputs, the sequence is symbolic), so the TVM implementations draw their static part from a
small pool and reuse each build across examples; the emulator has no build and draws it freely.
Inputs are fp16-representable so the emulator (fp16 storage, fp32 router) sees the same routing.

Tolerances (x max |reference|): cpu and portable 1e-4 (fp32, the project's rule);
ascend 1e-2 (fp16 storage: every op rounds to 11 bits, a few ops chained).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyport.compiler import signature
from polyport.ir import dtypes, fused
from polyport.ir.graph import Graph
from polyport.ir.symbolic import floordiv, sym
from polyport.ir.types import TensorType
from polyport.runtime.artifact import ArtifactWriter
from polyport.runtime.session import load
from polyport.targets.base import CompileOptions, get_target

tvm = pytest.importorskip("tvm")

TOL = {"cpu": 1e-4, "portable": 1e-4, "ascend": 1e-2}
IMPLS = ("cpu", "portable", "ascend")
FAST = dict(max_examples=3, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = dict(FAST, max_examples=50)
S = sym("s")


# ---- one-op graphs ------------------------------------------------------------------------------
def _half(rng, shape, scale=1.0):
    """Random values that fp16 stores exactly."""
    return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


class Case:
    """One fused node: its attributes, its operands (arrays, or None), and which operands are graph
    inputs (the rest constants; TVM builds take large float constants as bound parameters)."""

    def __init__(self, op, attrs, operands, shapes, inputs, out_shape):
        self.op, self.attrs, self.operands, self.shapes = op, attrs, operands, shapes
        self.inputs, self.out_shape = inputs, out_shape

    def graph(self, weights_as_inputs: bool) -> Graph:
        g = Graph("g")
        g.opset_imports[""] = 18
        vals = []
        for i, (x, shape) in enumerate(zip(self.operands, self.shapes)):
            if x is None:
                vals.append(None)
            elif i in self.inputs or weights_as_inputs:
                vals.append(g.add_input(f"in{i}", TensorType(dtypes.from_numpy(x.dtype), shape)))
            else:
                vals.append(g.add_constant(f"w{i}", x))
        out = fused.build(g, self.op, vals, self.attrs, TensorType(dtypes.F32, self.out_shape), name="op")
        g.set_outputs([out])
        return g

    def feeds(self, g: Graph) -> dict:
        return {v.name: self.operands[int(v.name[2:])] for v in g.inputs}

    def want(self):
        return fused.evaluate(self.op, self.operands, **self.attrs)


_BUILDS: dict = {}


def run_tvm(case: Case, kernels: str, key) -> np.ndarray:
    """Build once per (static key, kernel set); bind this example's weights to a fresh session."""
    from polyport.runtime.cpu_session import CpuSession
    weights_as_inputs = case.op in ("MoE", "Attention", "RMSNorm", "Rotary", "KVCompress")
    g = case.graph(weights_as_inputs)
    if (key, kernels) not in _BUILDS:
        _BUILDS[key, kernels] = get_target("cpu").build(g, CompileOptions(extra={"kernels": kernels}))[:2]
    executable, meta = _BUILDS[key, kernels]
    weights = {v.name: v.const for v in g.constants.values()}
    sess = CpuSession.from_executable(executable, meta, weights, signature(g, "g"))
    return sess.run(case.feeds(g))[g.outputs[0].name]


def run_ascend(case: Case, tmp_path) -> np.ndarray:
    g = case.graph(False)
    weights = {v.name: v.const for v in g.constants.values()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # documented fallbacks are part of the implementation
        with ArtifactWriter(tmp_path / "art", signature(g, "g")) as w:
            w.write_weights(weights)
            w.add_target("ascend", get_target("ascend").lower(g, w.target_dir("ascend"), weights, CompileOptions()))
            art = w.commit()
    return load(art, "ascend").run(case.feeds(g))[g.outputs[0].name]


def check(case: Case, impl: str, key, tmp_path_factory) -> None:
    want = case.want()
    got = run_ascend(case, tmp_path_factory.mktemp("a")) if impl == "ascend" else run_tvm(case, impl, key)
    assert got.shape == want.shape
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "masked entries differ"   # SparseIndexer's mask
    finite = np.isfinite(want)
    err = float(np.abs(got[finite].astype(np.float64) - want[finite]).max(initial=0.0))
    scale = max(float(np.abs(want[finite]).max(initial=0.0)), 1e-6)
    assert err <= TOL[impl] * scale, f"{case.op} {case.attrs} on {impl}: error {err:.3g} (max |ref| {scale:.3g})"


# ---- configurations -------------------------------------------------------------------------------
class Draw:
    """What a static-configuration drawer asks for: hypothesis' `draw`, or a seeded generator (pools)."""

    def __init__(self, draw=None, rng=None):
        self._draw, self._rng = draw, rng

    def choice(self, xs):
        return self._draw(st.sampled_from(xs)) if self._draw else xs[self._rng.integers(len(xs))]

    def integer(self, lo, hi):
        return self._draw(st.integers(lo, hi)) if self._draw else int(self._rng.integers(lo, hi + 1))

    def boolean(self):
        return self.choice([False, True])


def rmsnorm_static(draw):
    return dict(hidden=draw.choice([8, 16, 48]), batch=draw.choice([1, 2]),
                epsilon=draw.choice([1e-6, 1e-5]))


def rmsnorm_case(cfg, seq, rng) -> Case:
    b, h = cfg["batch"], cfg["hidden"]
    x, w = _half(rng, (b, seq, h), 2.0), _half(rng, (h,))
    return Case("RMSNorm", {"epsilon": cfg["epsilon"]}, [x, w], [(b, S, h), (h,)], {0, 1}, (b, S, h))


def rotary_static(draw):
    d = draw.choice([8, 16])
    return dict(d=d, heads=draw.choice([1, 3]), rotary_dim=draw.choice([0, d // 2]),
                interleaved=draw.choice([0, 1]))


def rotary_case(cfg, seq, rng) -> Case:
    d, h = cfg["d"], cfg["heads"]
    rd = cfg["rotary_dim"] or d
    pos = np.arange(seq)[:, None] * rng.uniform(0.01, 1.0, rd // 2)[None]
    ang = np.repeat(pos, 2, -1) if cfg["interleaved"] else np.concatenate([pos, pos], -1)
    cos, sin = (f(ang).astype(np.float16).astype(np.float32)[None, None] for f in (np.cos, np.sin))
    x = _half(rng, (1, h, seq, d))
    attrs = {"interleaved": cfg["interleaved"], "rotary_dim": cfg["rotary_dim"]}
    return Case("Rotary", attrs, [x, cos, sin], [(1, h, S, d), (1, 1, S, rd), (1, 1, S, rd)], {0, 1, 2},
                (1, h, S, d))


def mlp_static(draw):
    return dict(hidden=draw.choice([16, 32]), inter=draw.choice([16, 24, 32]),
                activation=draw.choice(["silu", "gelu", "gelu_tanh"]),
                clamp=draw.choice([0.0, 0.75]), rank3=draw.boolean())


def mlp_case(cfg, seq, rng) -> Case:
    h, i = cfg["hidden"], cfg["inter"]
    xs = (1, seq, h) if cfg["rank3"] else (seq, h)
    sym_xs = (1, S, h) if cfg["rank3"] else (S, h)
    x = _half(rng, xs)
    wg, wu = _half(rng, (h, i), 0.3), _half(rng, (h, i), 0.3)
    wd = _half(rng, (i, h), 0.3)
    attrs = {"activation": cfg["activation"], "clamp": cfg["clamp"]}
    return Case("GatedMLP", attrs, [x, wg, wu, wd], [sym_xs, (h, i), (h, i), (i, h)], {0}, sym_xs[:-1] + (h,))


def attention_static(draw):
    kvh = draw.choice([1, 2])
    d = draw.choice([8, 16])
    causal = draw.boolean()
    mask = draw.choice((["none", "float", "bool"] if not causal else ["none", "float"]))
    return dict(kv_heads=kvh, group=draw.choice([1, 2, 4]), d=d, dv=draw.choice([d, 8]),
                causal=int(causal), window=draw.choice([0, 1, 3]) if causal else 0, mask=mask,
                sinks=draw.boolean(), past=draw.choice([0, 3]), batch=draw.choice([1, 2]))


def attention_case(cfg, seq, rng) -> Case:
    b, kvh, d, dv, past = cfg["batch"], cfg["kv_heads"], cfg["d"], cfg["dv"], cfg["past"]
    h = kvh * cfg["group"]
    skv = seq + past
    q, k, v = _half(rng, (b, h, seq, d)), _half(rng, (b, kvh, skv, d)), _half(rng, (b, kvh, skv, dv))
    mask = None
    if cfg["mask"] == "float":
        mask = np.where(rng.random((1, 1, seq, skv)) < 0.2, -np.inf, _half(rng, (1, 1, seq, skv))).astype(np.float32)
    elif cfg["mask"] == "bool":
        mask = rng.random((1, 1, seq, skv)) < 0.8
    sinks = _half(rng, (h,)) if cfg["sinks"] else None
    attrs = {"num_heads": h, "kv_heads": kvh, "scale": float(np.float16(d ** -0.5)), "causal": cfg["causal"],
             "window": cfg["window"]}
    SKV = S + past
    shapes = [(b, h, S, d), (b, kvh, SKV, d), (b, kvh, SKV, dv), (1, 1, S, SKV), (h,)]
    operands = [q, k, v, mask, sinks]
    while operands[-1] is None:
        operands.pop()
        shapes.pop()
    return Case("Attention", attrs, operands, shapes, set(range(5)), (b, h, S, dv))


def moe_static(draw):
    e = draw.choice([4, 8])
    hashed = draw.boolean()
    groups = 1 if hashed else draw.choice([1, 2])
    return dict(hidden=draw.choice([8, 16]), experts=e, inter=draw.choice([8, 12]),
                top_k=draw.integer(1, e), scoring=draw.choice(["softmax", "sigmoid", "sqrtsoftplus"]),
                n_group=groups, topk_group=draw.integer(1, groups), renormalize=draw.choice([0, 1]),
                routed_scaling=draw.choice([1.0, 2.5]), bias=not hashed and draw.boolean(),
                hash_vocab=draw.choice([3, 7]) if hashed else 0,
                activation=draw.choice(["silu", "gelu"]), clamp=draw.choice([0.0, 1.0]))


def moe_case(cfg, seq, rng) -> Case:
    h, e, i, k, v = cfg["hidden"], cfg["experts"], cfg["inter"], cfg["top_k"], cfg["hash_vocab"]
    x = _half(rng, (seq, h))
    rw = _half(rng, (h, e), 0.5)
    bias = _half(rng, (e,), 0.3) if cfg["bias"] else None
    if bias is not None and rng.random() < 0.3:
        bias[rng.integers(e)] = 100.0               # every token on one expert: the others stay empty
    wg, wu = _half(rng, (e, h, i), 0.3), _half(rng, (e, h, i), 0.3)
    wd = _half(rng, (e, i, h), 0.3)
    attrs = {a: cfg[a] for a in ("top_k", "scoring", "n_group", "topk_group", "renormalize", "routed_scaling",
                                 "activation", "clamp")}
    operands = [x, rw, bias, wg, wu, wd]
    shapes = [(S, h), (h, e), (e,), (e, h, i), (e, h, i), (e, i, h)]
    if v:
        table = np.stack([rng.permutation(e)[:k] for _ in range(v)]).astype(np.int64)
        operands += [table, rng.integers(0, v, seq).astype(np.int64)]
        shapes += [(v, k), (S,)]
    return Case("MoE", attrs, operands, shapes, {0, 1, 2, 7}, (S, h))


def compress_static(draw):
    return dict(rate=draw.choice([1, 2, 4]), overlap=draw.choice([0, 1]), d=draw.choice([4, 8]),
                batch=draw.choice([1, 2]))


def compress_case(cfg, seq, rng) -> Case:
    b, rate, overlap = cfg["batch"], cfg["rate"], cfg["overlap"]
    c = cfg["d"] * (2 if overlap else 1)
    kv, gate, bias = _half(rng, (b, seq, c)), _half(rng, (b, seq, c), 2.0), _half(rng, (rate, c))
    return Case("KVCompress", {"rate": rate, "overlap": overlap}, [kv, gate, bias],
                [(b, S, c), (b, S, c), (rate, c)], {0, 1}, (b, floordiv(S, rate), cfg["d"]))


def indexer_static(draw):
    return dict(heads=draw.choice([1, 3]), dq=draw.choice([4, 8]), rate=draw.choice([1, 2, 4]),
                top_k=draw.integer(1, 3), past=draw.choice([0, 5]), batch=draw.choice([1, 2]))


def indexer_case(cfg, seq, rng) -> Case:
    b, h, dq, rate, past = cfg["batch"], cfg["heads"], cfg["dq"], cfg["rate"], cfg["past"]
    t = (seq + past) // rate            # the complete windows of the sequence so far
    q, k, w = _half(rng, (b, seq, h, dq)), _half(rng, (b, t, dq)), _half(rng, (b, seq, h))
    positions = (past + np.arange(seq, dtype=np.int64))[None]
    attrs = {"top_k": cfg["top_k"], "rate": rate, "scale": 0.5}
    T = floordiv(S + past, rate)
    return Case("SparseIndexer", attrs, [q, k, w, positions], [(b, S, h, dq), (b, T, dq), (b, S, h), (1, S)],
                {0, 1, 2, 3}, (b, 1, S, T))


OPS = {"RMSNorm": (rmsnorm_static, rmsnorm_case), "Rotary": (rotary_static, rotary_case),
       "GatedMLP": (mlp_static, mlp_case), "Attention": (attention_static, attention_case),
       "MoE": (moe_static, moe_case), "KVCompress": (compress_static, compress_case),
       "SparseIndexer": (indexer_static, indexer_case)}
POOL = 4          # static configurations per op and TVM kernel set in the slow run (1 in the default run)


def _statics(op: str, impl: str, pool: int):
    """(build key, static configuration): drawn freely for the emulator, from a fixed pool for TVM."""
    if impl == "ascend":
        return st.composite(lambda draw: (None, OPS[op][0](Draw(draw=draw))))()
    rng = np.random.default_rng(sorted(OPS).index(op))
    return st.sampled_from([(f"{op}{n}", OPS[op][0](Draw(rng=rng))) for n in range(pool)])


def _test(op: str, impl: str, pool: int, max_examples: int):
    @settings(**dict(FAST, max_examples=max_examples))
    @given(static=_statics(op, impl, pool), seq=st.integers(1, 9), seed=st.integers(0, 2**16))
    def run(static, seq, seed, tmp_path_factory):
        key, cfg = static
        check(OPS[op][1](cfg, seq, np.random.default_rng(seed)), impl, key, tmp_path_factory)
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
def test_fused_op_matches_reference(op, impl, tmp_path_factory):
    _test(op, impl, 1, 3)(tmp_path_factory=tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
def test_fused_op_matches_reference_50_configurations(op, impl, tmp_path_factory):
    _test(op, impl, POOL, 50)(tmp_path_factory=tmp_path_factory)

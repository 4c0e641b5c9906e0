"""The ascend "runtime": EMULATED ON CPU, there is no Ascend device here.

`load(art, entry, target="ascend")` opens the artifact's `ascend/model.onnx` and
`ascend/op_plan.json` (and, when compiled, the derived `prefill` / `decode`
programs with theirs), checks that each plan lists exactly its graph's calls in
order, and returns a session that runs them on NumPy (and generates through the
programs over paged KV caches: runtime/ascend_paged.py):

- each CANN operator (FusedInferAttentionScore, with block tables, actual KV
  lengths and the MLA rope inputs; ScatterPaKvCache, MoeGatingTopK,
  MoeInitRoutingV2, GroupedMatmul (with antiquant inputs), WeightQuantBatchMatmulV2,
  SwiGlu, MoeFinalizeRoutingV2, RmsNorm, RotaryPositionEmbedding) and each polyport
  Ascend C kernel by a NumPy implementation of its documented contract (as polyport
  transcribed it; not verified on a device);
- the standard ONNX ops by onnx's reference implementations, with the cube-unit
  ones (MatMul) and the reductions (ReduceSum, ReduceMean, Softmax) computed in
  fp32 and rounded to the storage dtype, as the device accumulates;
- activations and weights in float16 (bfloat16 when compiled with --dtype bf16) as
  on the device: every op rounds its result to that dtype; cube ops (matmuls,
  attention) take 16-bit operands and accumulate in fp32; RmsNorm, softmax and
  rotary compute in fp32 internally.

This says nothing about the speed, and nothing certain about the numerics, of a
real Ascend 910B: it checks that the emitted graph and op plan compute the model
at fp16 precision under polyport's reading of each operator's contract.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from .. import errors
from ..ir.fused import moe
from .ascend_paged import PagedCache
from .generation import Generator

NOTICE = ("ascend: emulated on CPU (no Ascend device): NumPy implementations of the CANN operators' documented "
          "contracts in {dtype}; nothing was run on Ascend hardware")

# The artifact's two custom ONNX domains (targets/ascend/ writes them; defined here, where they are read).
CANN_DOMAIN = "com.huawei.cann"          # CANN built-in operators (ATC maps them by op type)
KERNEL_DOMAIN = "polyport.ascendc"        # polyport's own Ascend C kernels (kernels/*.cpp)
F16 = np.float16
LOW = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))     # the device's 16-bit float storage dtypes

# Tests set these to lists to record every discrete choice, in call order: the experts each MoE routing
# took (ids [T, k]) and each TopK node's indices ((node name, indices): the sparse indexer's entries).
ROUTING_TRACE = None
TOPK_TRACE = None


def _trace(idx):
    if ROUTING_TRACE is not None:
        ROUTING_TRACE.append(np.asarray(idx))


def _f32(x):
    return np.asarray(x).astype(np.float32)


def _antiquant(w, scale, offset=None, group: int = 0):
    """ANTIQUANT(w) = (w + offset) * scale in float32 for a weight [K, N] of int8 / int4 codes; scale and
    offset per channel ([N] or [1, N]) or per group of K ([G, N]: `group` consecutive rows share a row, the
    last group possibly shorter; without `group`, K / G)."""
    k = w.shape[0]
    s = _f32(scale).reshape(-1, w.shape[1])
    o = np.zeros_like(s) if offset is None else _f32(offset).reshape(-1, w.shape[1])
    rep = group or k // s.shape[0]
    s, o = (np.repeat(a, rep, axis=0)[:k] for a in (s, o))
    return (_f32(w) + o) * s


NORM_TYPES = {0: "softmax", 1: "sigmoid", 2: "sqrtsoftplus"}   # the CANN ops' norm_type codes


def _score(logits, norm):
    name = NORM_TYPES.get(norm, norm)
    if name not in moe.SCORING:
        raise errors.ExecutionError(f"unknown norm_type {norm!r}")
    return moe.SCORING[name](_f32(logits)).astype(np.float32)


def _topk_gate(scores, bias, k, group_count, k_group, group_select_mode, renorm, scaling, eps):
    choice = scores + _f32(bias) if bias is not None else scores
    idx = moe.select_top_k(choice, k, group_count, k_group, "top2" if group_select_mode == 1 else "max")
    _trace(idx)
    return moe.routing_weights(scores, idx, renorm, scaling, eps), idx.astype(np.int32)


def _kv_rows(x, b: int, n, block_table, block_size: int, kv_heads: int) -> np.ndarray:
    """Sequence b's keys (or values) [kv_heads, n, dim]: BNSD rows, or read through its block table from a
    paged cache [num_blocks, block_size, kv_heads * dim]."""
    if block_table is None:
        return x[b] if n is None else x[b][:, :n]
    blocks = np.asarray(block_table[b][:-(-n // block_size)], np.int64)
    rows = x[blocks].reshape(-1, kv_heads, x.shape[-1] // kv_heads)[:n]
    return rows.transpose(1, 0, 2)


def _ops():
    """The OpRun classes: CANN operators, polyport kernels, fp32-accumulating standard ops."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops import load_op

    class RmsNorm(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, x, gamma, epsilon=1e-6):
            xf = _f32(x)
            rstd = 1.0 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + np.float32(epsilon))
            return ((xf * rstd * _f32(gamma)).astype(x.dtype), rstd.astype(np.float32))

    class RotaryPositionEmbedding(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, x, cos, sin, mode=0):
            xf = _f32(x)
            if mode == 1:    # interleave: pairs (x[2i], x[2i+1])
                r = np.empty_like(xf)
                r[..., 0::2], r[..., 1::2] = -xf[..., 1::2], xf[..., 0::2]
            else:            # half: (x1, x2) -> (-x2, x1)
                h = xf.shape[-1] // 2
                r = np.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
            return ((xf * _f32(cos) + r * _f32(sin)).astype(x.dtype),)

    class FusedInferAttentionScore(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, query, key, value, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                 actual_seq_lengths_kv=None, block_table=None, query_rope=None, key_rope=None, num_heads=1,
                 num_key_value_heads=1, scale=1.0, input_layout="BNSD", sparse_mode=0, pre_tokens=2147483647,
                 next_tokens=2147483647, inner_precise=0, block_size=0, softmax_lse_flag=0):
            if input_layout != "BNSD":
                raise errors.ExecutionError(f"FusedInferAttentionScore: the emulator implements BNSD, "
                                            f"got {input_layout}")
            if sparse_mode in (2, 3, 4) and (atten_mask is None or tuple(atten_mask.shape[-2:]) != (2048, 2048)):
                raise errors.ExecutionError("FusedInferAttentionScore: sparse_mode 2/3/4 need the compressed "
                                            "2048 x 2048 atten_mask")
            if sparse_mode not in (0, 2, 3, 4):
                raise errors.ExecutionError(f"FusedInferAttentionScore: sparse_mode {sparse_mode} not emulated")
            group = num_heads // num_key_value_heads
            outs, lses = [], []
            for b in range(query.shape[0]):
                n = None if actual_seq_lengths_kv is None else int(actual_seq_lengths_kv[b])
                kv = [_kv_rows(x, b, n, block_table, block_size, num_key_value_heads)
                      for x in (key, value, key_rope) if x is not None]
                k, v = (np.repeat(x, group, axis=0) for x in kv[:2])
                s = _f32(query[b]) @ np.swapaxes(_f32(k), -1, -2)           # cube: fp16 in, fp32 acc
                if query_rope is not None:                                   # MLA: the rope part scores apart
                    s = s + _f32(query_rope[b]) @ np.swapaxes(_f32(np.repeat(kv[2], group, axis=0)), -1, -2)
                s = s * np.float32(scale)
                sq, skv = s.shape[-2:]
                if pse_shift is not None:
                    s = s + _f32(pse_shift[b if pse_shift.shape[0] > 1 else 0])
                pos = np.arange(sq)[:, None] + (skv - sq)
                j = np.arange(skv)[None, :]
                keep = np.ones((sq, skv), bool)
                if sparse_mode == 2:
                    keep &= j <= np.arange(sq)[:, None]
                elif sparse_mode == 3:
                    keep &= j <= pos
                elif sparse_mode == 4:
                    keep &= (pos - j <= pre_tokens) & (j - pos <= next_tokens)
                elif atten_mask is not None:
                    keep = keep & ~np.asarray(atten_mask[b if atten_mask.shape[0] > 1 else 0], bool)
                s = np.where(keep, s, -np.inf)
                m = np.max(s, axis=-1, keepdims=True)
                m = np.where(np.isfinite(m), m, 0.0).astype(np.float32)
                e = np.exp(s - m)
                total = np.sum(e, axis=-1, keepdims=True)
                p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
                outs.append((_f32(p.astype(query.dtype)) @ _f32(v)).astype(query.dtype))   # P in fp16, fp32 acc
                with np.errstate(divide="ignore"):
                    lses.append(np.where(total > 0, m + np.log(total), -np.inf).astype(np.float32))
            out = np.stack(outs)
            return (out, np.stack(lses)) if softmax_lse_flag else (out,)

    class ScatterPaKvCache(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, key, key_cache, slot_mapping, value, value_cache, cache_mode="Norm"):
            if cache_mode != "Norm":
                raise errors.ExecutionError(f"ScatterPaKvCache: the emulator implements cache_mode Norm, "
                                            f"got {cache_mode}")
            slots = np.asarray(slot_mapping, np.int64)
            keep = slots >= 0                        # vLLM's PAD_SLOT_ID (-1): not written
            out = []
            for rows, cache in ((key, key_cache), (value, value_cache)):
                c = np.array(cache, copy=True)
                c.reshape(-1, *c.shape[2:])[slots[keep]] = rows[keep].astype(c.dtype)
                out.append(c)
            return tuple(out)

    class MoeGatingTopK(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, x, bias=None, k=1, k_group=1, group_count=1, group_select_mode=1, renorm=0, norm_type=0,
                 out_flag=0, routed_scaling_factor=1.0, eps=1e-20):
            return _topk_gate(_score(x, norm_type), bias, k, group_count, k_group, group_select_mode, renorm,
                              routed_scaling_factor, eps)

    class MoeGatingTopKSqrtSoftplus(OpRun):
        op_domain = KERNEL_DOMAIN

        def _run(self, x, bias=None, k=1, k_group=1, group_count=1, group_select_mode=1, renorm=0,
                 routed_scaling_factor=1.0, eps=1e-20):
            return _topk_gate(_score(x, "sqrtsoftplus"), bias, k, group_count, k_group, group_select_mode, renorm,
                              routed_scaling_factor, eps)

    class MoeHashRoutingGate(OpRun):
        op_domain = KERNEL_DOMAIN

        def _run(self, x, token_ids, table, k=1, norm_type="softmax", renorm=0, routed_scaling_factor=1.0,
                 eps=1e-20):
            scores = _score(x, norm_type)
            idx = moe.hash_select(table, token_ids)
            _trace(idx)
            return moe.routing_weights(scores, idx, renorm, routed_scaling_factor, eps), idx.astype(np.int32)

    class MoeInitRoutingV2(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, x, expert_idx, active_num=0, expert_capacity=0, expert_num=1, drop_pad_mode=0,
                 expert_tokens_count_or_cumsum_flag=1, expert_tokens_before_capacity_flag=0):
            t, k = expert_idx.shape
            flat = expert_idx.reshape(-1).astype(np.int64)
            order = np.argsort(flat, kind="stable")           # rows sorted by expert
            expanded_x = x[order // k]
            row_idx = np.empty(t * k, np.int32)
            row_idx[order] = np.arange(t * k, dtype=np.int32)  # source row (t*k + j) -> expanded row
            counts = np.bincount(flat, minlength=expert_num).astype(np.int64)
            tokens = np.cumsum(counts) if expert_tokens_count_or_cumsum_flag == 1 else counts
            return (expanded_x, row_idx, tokens.astype(np.int64))

    class GroupedMatmul(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, x, weight, group_list, bias=None, antiquant_scale=None, antiquant_offset=None, split_item=3,
                 group_type=0, group_list_type=0, act_type=0):
            ends = np.asarray(group_list, np.int64)
            if group_list_type == 1:
                ends = np.cumsum(ends)
            out = np.zeros((x.shape[0], weight.shape[-1]), np.float32)
            start = 0
            for e, end in enumerate(ends):
                if end > start:
                    w = weight[e] if antiquant_scale is None else _antiquant(
                        weight[e], antiquant_scale[e], None if antiquant_offset is None else antiquant_offset[e])
                    out[start:end] = _f32(x[start:end]) @ _f32(w)      # fp32 accumulation
                    if bias is not None:                                # one bias row per group
                        out[start:end] += _f32(bias[e])
                start = end
            return (out.astype(x.dtype),)

    class WeightQuantBatchMatmulV2(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, x, weight, antiquant_scale, antiquant_offset=None, bias=None, antiquant_group_size=0):
            y = _f32(x) @ _antiquant(weight, antiquant_scale, antiquant_offset, antiquant_group_size)
            if bias is not None:
                y = y + _f32(bias)
            return (y.astype(x.dtype),)

    class SwiGlu(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, x, dim=-1):
            a, b = np.split(_f32(x), 2, axis=dim)
            return ((a / (1.0 + np.exp(-a)) * b).astype(x.dtype),)

    class MoeFinalizeRoutingV2(OpRun):
        op_domain = CANN_DOMAIN

        def _run(self, expanded_x, expanded_row_idx, x1=None, x2=None, bias=None, scales=None, expert_idx=None,
                 drop_pad_mode=0):
            t, k = scales.shape
            rows = _f32(expanded_x)[expanded_row_idx.astype(np.int64)].reshape(t, k, -1)
            if bias is not None:
                rows = rows + _f32(bias)[expert_idx.astype(np.int64)]
            out = np.sum(rows * _f32(scales)[..., None], axis=1)
            for skip in (x1, x2):
                if skip is not None:
                    out = out + _f32(skip)
            return (out.astype(expanded_x.dtype),)

    def fp32_accumulating(name: str, version: int):
        base = load_op("", name, version)

        def _run(self, *args, **kwargs):
            low = next((a.dtype for a in args if isinstance(a, np.ndarray) and a.dtype in LOW), None)
            if low is None:
                return base._run(self, *args, **kwargs)
            args = tuple(a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype in LOW else a
                         for a in args)
            return tuple(r.astype(low) if isinstance(r, np.ndarray) and r.dtype == np.float32 else r
                         for r in base._run(self, *args, **kwargs))
        return type(name, (base,), {"op_domain": "", "_run": _run})

    class GatherElements(OpRun):     # onnx 1.23's reference rejects indices shorter than the data
        op_domain = ""

        def _run(self, data, indices, axis=0):
            from ..ir.onnx_reference import gather_elements
            return (gather_elements(data, indices, axis),)

    class TopK(load_op("", "TopK", 18)):
        op_domain = ""

        def _run(self, *args, **kwargs):
            out = super()._run(*args, **kwargs)
            if TOPK_TRACE is not None:
                TOPK_TRACE.append((self.onnx_node.name, np.asarray(out[1])))
            return out

    standard = [fp32_accumulating(n, 18) for n in ("MatMul", "ReduceSum", "ReduceMean", "Softmax")]
    standard += [GatherElements, TopK]
    return [RmsNorm, RotaryPositionEmbedding, FusedInferAttentionScore, ScatterPaKvCache, MoeGatingTopK,
            MoeGatingTopKSqrtSoftplus, MoeHashRoutingGate, MoeInitRoutingV2, GroupedMatmul, WeightQuantBatchMatmulV2,
            SwiGlu, MoeFinalizeRoutingV2] + standard


class _Program:
    """One emitted ONNX model and its op plan, checked to list the same calls, run by onnx's evaluator."""

    def __init__(self, folder, stem: str, plan_file: str):
        import onnx
        from onnx.reference import ReferenceEvaluator
        self.model = onnx.load(str(folder / f"{stem}.onnx"))
        self.plan = json.loads((folder / plan_file).read_text())
        calls, nodes = self.plan["calls"], list(self.model.graph.node)
        if len(calls) != len(nodes):
            raise errors.PolyportError(f"{folder}: ascend op plan {plan_file} lists {len(calls)} calls, {stem}.onnx "
                                       f"has {len(nodes)} nodes; recompile the artifact")
        for c, n in zip(calls, nodes):
            if c["name"] != n.name or c["op"] != n.op_type:
                raise errors.PolyportError(f"{folder}: ascend op plan call {c['index']} ({c['name']}: {c['op']}) "
                                           f"does not match {stem}.onnx node {n.name} ({n.op_type})")
        self.output_names = [o.name for o in self.model.graph.output]
        self._eval = ReferenceEvaluator(self.model, new_ops=_ops())

    def run(self, feeds: Mapping[str, np.ndarray]) -> list:
        try:
            return self._eval.run(None, dict(feeds))
        except errors.PolyportError:
            raise
        except Exception as e:  # noqa: BLE001 - a failing emulated op is reported, not a traceback
            raise errors.ExecutionError(f"ascend emulator failed: {type(e).__name__}: {e}") from e


class AscendEmulatorSession(Generator):
    """Runs an artifact's ascend op plan on CPU. `notice` says so; the CLI prints it.

    With the derived programs (the entry's `programs`), it generates through them (runtime/generation.py's
    protocol): `new_cache` allocates the paged float16 caches (runtime/ascend_paged.py), `run_program`
    feeds them with the block tables and slot mappings and keeps the caches the program returns."""

    def __init__(self, art, entry: Mapping[str, Any]):
        from .session import signature_index_ranges, signature_types
        folder = art.path / "ascend"
        self.entry = dict(entry)
        self.notice = NOTICE.format(dtype=entry.get("compute_dtype", "float16"))
        self.artifact = art
        self.signature = art.signature
        self._main = _Program(folder, "model", "op_plan.json")
        self.model, self.plan = self._main.model, self._main.plan
        self._programs = {name: _Program(folder, name, f"{name}.op_plan.json") for name in entry.get("programs", ())}
        self._specs = signature_types(self.signature["inputs"])
        self._ranges = signature_index_ranges(self.signature["inputs"])
        self._out_specs = signature_types(self.signature["outputs"])
        self.input_names = [s["name"] for s in self.signature["inputs"]]
        self.output_names = [s["name"] for s in self.signature["outputs"]]

    @property
    def generation(self) -> dict[str, Any]:
        """The artifact's `generation` entry; no cache layers without the programs (generation recomputes)."""
        info = dict(self.artifact.manifest.get("generation") or {})
        if not {"prefill", "decode"} <= set(self._programs):
            info["layers"] = []
        return info

    def new_cache(self, batch: int, max_length: int) -> PagedCache:
        return PagedCache(self.entry["paged_cache"], batch, max_length)

    def run_program(self, name: str, feeds: Mapping[str, np.ndarray], cache: PagedCache) -> np.ndarray:
        """Run `prefill` / `decode` over the paged `cache` (replaced by the returned caches); logits [batch, vocab].

        A decode step longer than a ring's slack (PagedCache.max_step) runs as several steps."""
        ids = np.asarray(feeds["input_ids"], np.int64)
        if name == "decode" and ids.shape[1] > cache.max_step:
            past, logits = np.asarray(feeds["past_len"], np.int64), None
            for i in range(0, ids.shape[1], cache.max_step):
                chunk = ids[:, i:i + cache.max_step]
                logits = self.run_program(name, {"input_ids": chunk, "past_len": past + i}, cache)
            return logits
        if name == "prefill":
            n_new = np.asarray(feeds["lengths"], np.int64)
            past = np.zeros_like(n_new)
        else:
            past = np.asarray(feeds["past_len"], np.int64)
            n_new = np.full_like(past, ids.shape[1])
        program = self._programs[name]
        outs = program.run({**feeds, **cache.feeds(past, n_new, ids.shape[1])})
        for out_name, x in zip(program.output_names[1:], outs[1:]):
            cache.arrays[out_name[:-len(".out")]] = x
        return np.asarray(outs[0]).astype(np.float32)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .memory import check_fits
        from .reference import check_feeds
        check_fits("ascend", self._specs + self._out_specs, check_feeds(self._specs, feeds, self._ranges))
        outs = self._main.run({k: np.asarray(v) for k, v in feeds.items()})
        result = {}
        for (name, t), x in zip(self._out_specs, outs):
            result[name] = np.asarray(x).astype(t.dtype.numpy, copy=False)
        return result


def load(art, entry: Mapping[str, Any], target: str = "ascend", **options: Any) -> AscendEmulatorSession:
    if target != "ascend":
        raise errors.PolyportError(f"the ascend emulator cannot load target {target!r}")
    if options:
        raise errors.PolyportError(f"ascend emulator: unknown options {sorted(options)}")
    return AscendEmulatorSession(art, entry)

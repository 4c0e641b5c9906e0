"""The derived prefill / decode programs on Ascend: one ATC-ready ONNX per program, its KV caches paged.

The caches take CANN's paged layout, the one vLLM-Ascend allocates and hands to torch_npu
(vllm-project/vllm-ascend, vllm_ascend/attention/attention_v1.py: key_cache [num_blocks, block_size,
num_kv_heads, head_size]; writes through `_npu_reshape_and_cache(key, value, key_cache, value_cache,
slot_indices)`, decode reads through `npu_fused_infer_attention_score(query, key_cache.view(num_blocks,
block_size, -1), ..., block_table=, block_size=, actual_seq_lengths_kv=)`). Each program's ONNX takes

    input_ids, lengths | past_len      the derived program's own inputs (positions, last rows)
    block_table.{group}  int32 [batch, max_blocks]   physical block of each sequence's logical block
    slot_mapping.{group} int32 [batch * step]        block * block_size + offset of each new row
    the caches           float16 | bfloat16 [num_blocks.{group}, block_size, kv_heads, head_dim]

and returns `logits` then each cache's `.out` (the graph carries the caches in and out; on a device the
outputs alias the inputs, as the Ref inputs of the CANN operators are updated in place).

Groups: `linear` (caches up to max_length) and `window{W}` (sliding-window layers). A window group's
sequence owns a ring of ceil(W / block_size) + 1 blocks and its block table repeats them, so position p
always lands in ring slot p mod (ring blocks x block_size): memory is bounded by the window, FIA reads
every logical position through the table, and its sparse_mode 4 band hides the positions the ring no
longer holds. The extra block lets a decode step of up to block_size + 1 tokens write before it reads
(the session splits longer steps). The host computes block tables and slot mappings, as vLLM-Ascend's
model runner does; rows a step must not write (prompt padding, rows a ring cannot keep) go to a scratch
block no table references.

An MLA layer (kind "mla") keeps two caches, `{tensor}.nope` (the normalised latent, kv_lora_rank) and
`{tensor}.rope` (the rotated rope key), as vLLM-Ascend's mla_v1 does (kv_cache[0] / kv_cache[1], both
written by one _npu_reshape_and_cache with key = latent, value = rope key).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from onnx import TensorProto, helper

from ...errors import PolyportError
from ...ir.graph import Graph, Node
from .emission import CANN_DOMAIN, KERNEL_DOMAIN, NOT_RUN, OPSET, SOC, Emitter, check_model, tname

BLOCK_SIZE = 128          # vLLM-Ascend's default block size; FIA's paged path takes multiples of 16 (limits.py)
PROGRAMS = ("prefill", "decode")


def group_of(layer) -> str:
    return f"window{layer.capacity}" if layer.capacity else "linear"


def paged_layout(layers, compute: int) -> dict:
    """The paged caches of the derived layers (the manifest entry's `paged_cache`; the session allocates them)."""
    groups: dict[str, dict] = {}
    caches = []
    for layer in layers:
        group = group_of(layer)
        groups[group] = {"window": layer.capacity,
                         "ring_blocks": -(-layer.capacity // BLOCK_SIZE) + 1 if layer.capacity else None}
        if layer.kind == "mla":
            parts = [(f"{layer.tensors[0]}.nope", layer.v_head_dim),
                     (f"{layer.tensors[0]}.rope", layer.head_dim - layer.v_head_dim)]
        else:
            parts = list(zip(layer.tensors, (layer.head_dim, layer.v_head_dim)))
        for name, dim in parts:
            caches.append({"name": name, "of": layer.tensors[0] if layer.kind == "mla" else name,
                           "group": group, "kv_heads": layer.kv_heads, "head_dim": dim})
    return {"block_size": BLOCK_SIZE, "dtype": tname(compute), "groups": groups, "caches": caches}


class Paged:
    """What the cache lowerings (cache.py) need of a program: layers, groups, the emitted cache names."""

    def __init__(self, graph: Graph, layers, layout: dict):
        self.layout = layout
        self.block_size = layout["block_size"]
        self.layer = {t: layer for layer in layers for t in layer.tensors}
        self.inputs: dict[str, list[str]] = {}          # derived cache tensor -> its emitted cache inputs
        for c in layout["caches"]:
            self.inputs.setdefault(c["of"], []).append(c["name"])
        self.updates: dict[str, Node] = {}              # derived cache tensor -> the CacheUpdate writing it
        for v in graph.inputs:
            for user, i in v.uses:
                if user.op_type == "CacheUpdate" and i == 0:
                    self.updates[v.name] = user
        self.written: dict[str, list[str]] = {}         # derived cache tensor -> the emitted cache outputs
        self.kv_lengths: Optional[str] = None

    def group(self, tensor: str) -> str:
        return group_of(self.layer[tensor])


def write_programs(programs, out_dir: Path, compute: int) -> dict:
    """Emit the prefill / decode models (the caller saves them: weights.py) and write their op plans: {layout,
    models [(name, ModelProto)], cann
    (the CANN operators called), fallbacks (limits broken, with what was emitted instead)}."""
    layout = paged_layout(programs.layers, compute)
    models, cann, fallbacks = [], set(), []
    for name in PROGRAMS:
        model, plan, fell = emit_program(getattr(programs, name), programs.layers, layout, compute)
        check_model(model)
        doc = {"soc_version": SOC, "compute_dtype": tname(compute), "status": NOT_RUN, "program": name,
               "paged_cache": layout, "note": "calls in execution order; shapes use symbolic dims as text",
               "calls": plan}
        (Path(out_dir) / f"{name}.op_plan.json").write_text(json.dumps(doc, indent=1) + "\n")
        models.append((name, model))
        cann |= {c["op"] for c in plan if c["kind"] == "cann_operator"}
        fallbacks += [{**f, "program": name} for f in fell]
    return {"layout": layout, "models": models, "cann": sorted(cann), "fallbacks": fallbacks}


def emit_program(graph: Graph, layers, layout: dict, compute: int):
    em = Emitter(graph, compute)
    em.paged = paged = Paged(graph, layers, layout)
    caches = [v for v in graph.inputs if v.name in paged.layer]
    plain = [v for v in graph.inputs if v.name not in paged.layer]
    em.used.update(v.name for v in graph.outputs)
    em.declare_inputs(plain)
    inputs = [helper.make_tensor_value_info(v.name, v.type.dtype.onnx, em.shape[v.name]) for v in plain]

    def declare(name: str, elem: int, shape: list) -> None:
        em.used.add(name)
        em.elem[name], em.shape[name] = elem, shape
        inputs.append(helper.make_tensor_value_info(name, elem, shape))

    for group in layout["groups"]:
        declare(f"block_table.{group}", TensorProto.INT32, ["batch", f"max_blocks.{group}"])
        declare(f"slot_mapping.{group}", TensorProto.INT32, ["tokens"])
    for c in layout["caches"]:
        declare(c["name"], compute, cache_shape(c, layout))
    if len(caches) != len(paged.inputs):
        raise PolyportError(f"ascend: the {graph.name} program's cache inputs do not match its layers")
    em.walk()
    missing = [t for t in paged.inputs if t not in paged.written]
    if missing:
        raise PolyportError(f"ascend: the {graph.name} program never writes cache {missing[0]}")
    outputs = em.declare_outputs(graph.outputs[:1])
    for c in layout["caches"]:
        outputs.append(helper.make_tensor_value_info(f"{c['name']}.out", compute, cache_shape(c, layout)))
    gp = helper.make_graph(em.nodes, graph.name, inputs, outputs, em.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(CANN_DOMAIN, 1)]
    if em.kernels:
        opsets.append(helper.make_opsetid(KERNEL_DOMAIN, 1))
    model = helper.make_model(gp, opset_imports=opsets, producer_name="polyport", ir_version=8)
    model.doc_string = f"polyport ascend {graph.name} program for {SOC}; {NOT_RUN}"
    return model, em.plan, em.fallbacks


def cache_shape(c: dict, layout: dict) -> list:
    return [f"num_blocks.{c['group']}", layout["block_size"], c["kv_heads"], c["head_dim"]]

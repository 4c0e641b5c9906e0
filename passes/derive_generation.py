"""Derive KV-cache prefill and decode programs from a cache-less fused graph.

Everything upstream of a `polyport::Attention` in a decoder layer is per token,
so the derived programs run the export's graph on the new tokens only and change
just what mixes tokens or depends on where a token sits:

- every cacheable Attention writes its new K/V into its layer's cache
  (`CacheUpdate`) and, in decode, attends over the cache (`CachedAttention`);
- the position source (the `Range(0, seq, 1)` that indexes the cos/sin tables
  of every `Rotary`) becomes `past_len + arange(step)`;
- the LM head runs on one row per sequence (the last real one).

DeepSeek V4's compressed layers (CSA / HCA) cache their window keys, compressed entries and the raw tail
not yet compressed (passes/derive_compressed.py); their decode takes one token per step.

A layer whose Attention cannot be cached (an explicit mask input, not causal, K/V
that are not exactly the new tokens) or a softmax over the sequence left unfused is listed in `uncached`;
then no programs are derived and generation recomputes the whole sequence (the runtime warns).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..ir import dtypes
from ..ir.graph import Graph, Node, Value
from ..ir.infer import infer_node
from ..ir.ops import POLYPORT_DOMAIN, attrs_of, checked_attrs
from ..ir.symbolic import sym
from ..ir.types import TensorType
from ._match_util import ints
from .derive_compressed import CompressedPlan, CompressedTensors, compressed_layer, compressed_plan
from .generation_batch import make_batch_generic, retype

CAPACITY = "cache_len"        # the symbolic capacity of linear caches (the runtime's max_length)
COMPRESSED_PER_SEQUENCE = "compressed layers (CSA/HCA) decode each sequence on its own cache"
COMPRESSED_DECODE = ("compressed layers (CSA/HCA) decode through their caches on the reference executor, cpu, "
                     "cuda and rocm; ascend recomputes the whole sequence")


@dataclasses.dataclass
class CacheLayer:
    """One attention layer's cache, as the manifest and `inspect` state it."""
    name: str                 # cache.{i}
    node: str                 # the Attention node it serves
    kind: str                 # mha | window | shared_kv | mla
    tensors: list[str]
    kv_heads: int
    head_dim: int
    v_head_dim: int
    capacity: Optional[int]   # ring slots (window); None: linear up to max_length
    dtype: str
    naive_bytes_per_token: Optional[int] = None   # mla: K and V per head, what the absorbed layout saves
    rate: Optional[int] = None                    # hca / csa: tokens per compressed entry
    shapes: Optional[dict] = None                 # hca / csa: tensor -> [heads, slots, dim]; slots: a ring's
    #                                               count, "max_length" or "max_length/RATE" (rounded up)

    @property
    def bytes_per_token(self) -> int:
        """What each token of context adds (compressed layers: their entries; their rings are fixed_bytes)."""
        itemsize = dtypes.from_name(self.dtype).itemsize_bits // 8
        if self.shapes is not None:
            grows = sum(h * d * itemsize * (1 if slots == "max_length" else 0) for h, slots, d in self.shapes.values())
            per_entry = sum(h * d * itemsize for h, slots, d in self.shapes.values() if isinstance(slots, str)
                            and slots != "max_length")
            return grows + per_entry // self.rate
        width = self.head_dim if len(self.tensors) == 1 else self.head_dim + self.v_head_dim
        return self.kv_heads * width * itemsize

    @property
    def fixed_bytes(self) -> Optional[int]:
        """Compressed layers: the rings (window keys, raw tail), whatever the context."""
        if self.shapes is None:
            return None
        itemsize = dtypes.from_name(self.dtype).itemsize_bits // 8
        return sum(h * slots * d * itemsize for h, slots, d in self.shapes.values() if isinstance(slots, int))

    def entry(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "capacity"}
        d["bytes_per_token"] = self.bytes_per_token
        if self.fixed_bytes is not None:
            d["fixed_bytes"] = self.fixed_bytes
        if self.naive_bytes_per_token:
            d["naive_ratio"] = round(self.naive_bytes_per_token / self.bytes_per_token, 3)
        return d


@dataclasses.dataclass
class GenerationPrograms:
    prefill: Optional[Graph]
    decode: Optional[Graph]
    layers: list[CacheLayer]
    uncached: list[str]
    vocab: int
    max_positions: Optional[int]        # rows of a constant cos/sin table the positions index; None: no limit
    recompute: Optional[str] = None     # why generation recomputes though every layer could be cached
    per_sequence: Optional[str] = None  # why a batch-1 export's programs kept batch 1 (one cache per sequence)
    decode_step: Optional[int] = None   # tokens one decode call takes at most (the runtime splits longer appends)
    compressed_decode: Optional[str] = None   # CSA/HCA layers: which targets decode them (targets/base.py)

    def added_constants(self) -> dict[str, np.ndarray]:
        """The constants the derivation added (absorbed MLA weights, small index constants), by name."""
        return {v.name: v.const for p in (self.prefill, self.decode) if p is not None
                for v in p.constants.values() if v.name.startswith(f"{p.name}.")}

    def manifest(self) -> dict:
        entry = {"layers": [layer.entry() for layer in self.layers], "uncached": list(self.uncached),
                 "vocab": self.vocab, "max_positions": self.max_positions,
                 "bytes_per_token": sum(layer.bytes_per_token for layer in self.layers)}
        extra = {k: v for k, v in (("recompute", self.recompute), ("per_sequence", self.per_sequence),
                                   ("decode_step", self.decode_step),
                                   ("compressed_decode", self.compressed_decode)) if v}
        return {**entry, **extra}

    def describe(self) -> str:
        """The cache layout, one line per layer (what `inspect --passes generate` prints)."""
        lines = ["generation cache layout (bytes per token per layer):"]
        for layer in self.layers:
            if layer.shapes is not None:
                tensors = ", ".join(f"{t.rsplit('.', 1)[1]} {s[1]}x{s[2]}" for t, s in layer.shapes.items())
                lines.append(f"  {layer.name} ({layer.node}): {layer.kind}, shared K=V {layer.head_dim} {layer.dtype}, "
                             f"window ring of {layer.capacity or 'max_length'} + one entry per {layer.rate} tokens "
                             f"({tensors}): {layer.bytes_per_token} B/token + {layer.fixed_bytes} B of rings")
                continue
            cap = f"ring of {layer.capacity} positions" if layer.capacity else "up to max_length"
            naive = (f" ({layer.naive_bytes_per_token / layer.bytes_per_token:.2f}x less than K/V per head: "
                     f"{layer.naive_bytes_per_token} B)" if layer.naive_bytes_per_token else "")
            lines.append(f"  {layer.name} ({layer.node}): {layer.kind}, {layer.kv_heads} kv heads x "
                         f"{layer.head_dim}{'' if len(layer.tensors) == 1 else f'+{layer.v_head_dim}'} "
                         f"{layer.dtype}, {cap}: {layer.bytes_per_token} B/token{naive}")
        for name in self.uncached:
            lines.append(f"  {name}: NOT cached (generation recomputes the whole sequence)")
        if self.per_sequence:
            lines.append(f"  programs of batch 1 (one cache per sequence): {self.per_sequence}")
        if self.decode_step:
            lines.append(f"  decode takes {self.decode_step} token per call (longer appends are split)")
        if self.compressed_decode:
            lines.append(f"  {self.compressed_decode}")
        return "\n".join(lines)


def generation_entry(graph: Graph, programs: GenerationPrograms) -> dict:
    """The manifest's `generation` entry: the layout plus the programs' batch (None: symbolic; 1 when the
    export's is static 1 and its programs could not be made batch-generic)."""
    source = programs.prefill if programs.prefill is not None else graph
    shape = source.inputs[0].shape if source.inputs else None
    return {**programs.manifest(), "batch": shape[0] if shape and isinstance(shape[0], int) else None}


def without_programs(graph: Graph, why: str) -> GenerationPrograms:
    """No derived programs, by choice (`why`): generation recomputes the whole sequence each step."""
    return GenerationPrograms(None, None, [], [], _vocab(graph), None, why)


def derive_generation(graph: Graph, *, batch_generic: bool = True) -> GenerationPrograms:
    """The prefill and decode programs of a fused graph (the graph itself is left unchanged). A batch-1
    export's programs get a symbolic batch unless `batch_generic` is False (passes/generation_batch.py)."""
    attentions = [n for n in graph.nodes if _is(n, "Attention")]
    vocab = _vocab(graph)
    if len(graph.inputs) != 1:        # the programs feed token ids only
        return GenerationPrograms(None, None, [], [n.name for n in attentions] or [graph.name], vocab, None)
    ids = graph.inputs[0]
    compressed = {n.name: plan for n in attentions if not _cacheable(n) and (plan := compressed_plan(n)) is not None}
    uncached = [n.name for n in attentions if not _cacheable(n) and n.name not in compressed]
    uncached += _unfused_attention(graph)
    ranges = _position_sources(graph)
    uncached += _other_positions(graph, ranges)
    entry_ranges = {id(r) for plan in compressed.values() for r in plan.ranges}
    ranges = [r for r in ranges if id(r) not in entry_ranges]     # entry positions: derive_compressed.py
    batch = ids.shape[0] if ids.shape else None
    if ranges and batch != 1:
        uncached = uncached or [n.name for n in attentions]   # positions [batch, step] need a batched arange
    if compressed and batch != 1:
        uncached = uncached or list(compressed)             # entry positions: one vector, a batch-1 program's
    if not attentions or any(True for n in graph.nodes for _ in n.subgraphs()):
        uncached = uncached or [n.name for n in attentions] or [graph.name]
    if uncached:
        return GenerationPrograms(None, None, [], uncached, vocab, None)
    plans = {n.name: plan for n in attentions if n.name not in compressed and (plan := mla_plan(n)) is not None}
    plans.update(compressed)
    layers = [_layer(i, n, plans.get(n.name)) for i, n in enumerate(attentions)]
    programs = [_program(graph, kind, layers, ranges, plans) for kind in ("prefill", "decode")]
    per_sequence = None
    if compressed:       # decode's entry positions are one vector for the batch: one sequence per cache
        return GenerationPrograms(*programs, layers, [], vocab, _max_positions(ranges),
                                  per_sequence=COMPRESSED_PER_SEQUENCE, decode_step=1,
                                  compressed_decode=COMPRESSED_DECODE)
    if batch == 1 and batch_generic:   # every corpus export: batch the programs by meaning, else one cache per sequence
        per_sequence = next((why for p in programs if (why := make_batch_generic(p))), None)
        if per_sequence is not None:
            programs = [_program(graph, kind, layers, ranges, plans) for kind in ("prefill", "decode")]
    return GenerationPrograms(*programs, layers, [], vocab, _max_positions(ranges), per_sequence=per_sequence)


def _is(node: Node, op: str) -> bool:
    return node.domain == POLYPORT_DOMAIN and node.op_type == op


def _cacheable(node: Node) -> bool:
    ins = node.inputs
    mask = ins[3] if len(ins) > 3 else None
    shapes = [v.shape for v in ins[:3]]
    return (bool(attrs_of(node)["causal"]) and mask is None
            and all(s is not None and len(s) == 4 and isinstance(s[1], int) and isinstance(s[3], int)
                    for s in shapes)
            and shapes[1][2] == shapes[0][2] and shapes[2][2] == shapes[0][2])   # K/V: the new tokens only


def _unfused_attention(graph: Graph) -> list[str]:
    """Softmaxes over a sequence-long axis left outside `Attention` (a DeepSeek V4 compressor that
    fuse-compress did not make a KVCompress): token mixing no cache layout here captures."""
    seq = graph.inputs[0].type.symbols if isinstance(graph.inputs[0].type, TensorType) else frozenset()
    out = []
    for n in graph.nodes:
        shape = n.inputs[0].shape if n.op_type == "Softmax" and not n.domain else None
        if shape and not isinstance(shape[-1], int) and (shape[-1] is None or shape[-1].symbols & seq):
            out.append(n.name)
    return out


def _layer(i: int, node: Node, plan) -> CacheLayer:
    q, k, v = node.inputs[:3]
    window = attrs_of(node)["window"]
    name = f"cache.{i}"
    if isinstance(plan, CompressedPlan):
        return _compressed_layer(name, node, plan)
    mla = plan
    if mla is not None and not window:
        naive = node.attrs["kv_heads"] * (k.shape[3] + v.shape[3]) * (k.dtype.itemsize_bits // 8)
        return CacheLayer(name, node.name, "mla", [f"{name}.kv"], 1, mla.dc + mla.dr, mla.dc, None, str(k.dtype),
                          naive)
    shared = k is v
    kind = "shared_kv" if shared else ("window" if window else "mha")
    tensors = [f"{name}.kv"] if shared else [f"{name}.k", f"{name}.v"]
    return CacheLayer(name, node.name, kind, tensors, k.shape[1], k.shape[3], v.shape[3], window or None,
                      str(k.dtype))


def _compressed_layer(name: str, node: Node, plan: CompressedPlan) -> CacheLayer:
    names = CompressedTensors.of(name, plan)
    d = plan.keys.shape[3]
    entries = f"max_length/{plan.rate}"
    shapes = {names.kv: [1, plan.window or "max_length", d], names.entries: [1, entries, d]}
    if plan.index is not None:
        shapes[names.index] = [1, entries, plan.index.entries.shape[-1]]
    for prefix, comp in plan.compressors():
        for tensor in names.raw[prefix]:
            shapes[tensor] = [1, comp.ring, comp.channels]
    return CacheLayer(name, node.name, plan.kind, names.names(), 1, d, d, plan.window or None, str(plan.keys.dtype),
                      rate=plan.rate, shapes=shapes)


def _vocab(graph: Graph) -> int:
    shape = graph.outputs[0].shape if graph.outputs else None
    return int(shape[-1]) if shape and isinstance(shape[-1], int) else 0


def _position_sources(graph: Graph) -> list[Node]:
    """The Range(0, n, 1) nodes the cos/sin inputs of every Rotary are computed from."""
    found, seen = [], set()
    stack = [v for n in graph.nodes if _is(n, "Rotary") for v in n.inputs[1:3]]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or v.producer is None:
            continue
        seen.add(id(v))
        node = v.producer
        if _arange(node):
            found.append(node)
            continue
        stack.extend(node.inputs)
    return found


def _arange(node: Node) -> bool:
    return node.op_type == "Range" and not node.domain and ints(node.inputs[0]) == [0] and ints(node.inputs[2]) == [1]


def _other_positions(graph: Graph, ranges: list[Node]) -> list[str]:
    """Position vectors over the sequence that feed no fused `Rotary` (DeepSeek-V2's complex RoPE is
    left unfused): decode cannot move them to `past_len + arange(step)`, so those models recompute."""
    seq = graph.inputs[0].type.symbols if isinstance(graph.inputs[0].type, TensorType) else frozenset()

    def over_seq(node: Node) -> bool:
        shape = node.outputs[0].shape
        return bool(shape) and (shape[0] is None or not isinstance(shape[0], int) and bool(shape[0].symbols & seq))
    return [n.name for n in graph.nodes if _arange(n) and n not in ranges and over_seq(n)]


def _max_positions(ranges: list[Node]) -> Optional[int]:
    """The rows of a constant cos/sin (or position embedding) table the positions index, if any:
    exports that compute cos/sin from inv_freq state no limit (None)."""
    stack, seen, rows = [r.outputs[0] for r in ranges], set(), []
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for user, i in v.uses:
            if user.op_type == "Gather" and not user.domain and i == 1 and user.inputs[0].is_constant:
                rows.append(user.inputs[0].const.shape[user.attrs.get("axis", 0)])
            elif user.op_type not in ("Rotary", "Attention"):
                stack.extend(user.outputs)
    return min(rows) if rows else None


# ---- DeepSeek MLA: the absorbed layout --------------------------------------------------------

@dataclasses.dataclass
class MlaPlan:
    """k_h = [c W_uk,h ; r], v_h = c W_uv,h with c the normalised latent [.., S, dc] and r the rotated
    rope key [B, 1, S, dr] shared by all heads; W = [dc, H * (nope + dv)], per head [W_uk,h | W_uv,h]."""
    latent: Value
    rope: Value
    w_uk: np.ndarray          # [H, nope, dc]: the absorbed query is q_nope @ w_uk
    w_uv: np.ndarray          # [H, dc, dv]:   the output is attention over the latent @ w_uv
    nope: int

    @property
    def dc(self) -> int:
        return self.w_uk.shape[2]

    @property
    def dr(self) -> int:
        return self.rope.shape[-1]


_LAYOUT_OPS = {"Transpose", "Concat", "Expand", "Reshape", "Slice", "Split", "Unsqueeze", "Squeeze"}


def mla_plan(node: Node) -> Optional[MlaPlan]:
    """Recognise MLA by meaning: V is a slice of an up-projection of one latent, K is the other slice
    plus one rope key shared by every head. Checked numerically on the region (random latents)."""
    q, k, v = node.inputs[:3]
    h, dqk, dv = node.attrs["num_heads"], k.shape[3], v.shape[3]
    up = _through_layout(v, lambda n: _linear_weight(n) is not None)
    ropes = _leaves(k, lambda n: n.domain == POLYPORT_DOMAIN and n.op_type == "Rotary")
    if up is None or len(ropes) != 1:
        return None
    latent, w = up.inputs[0], _linear_weight(up)
    rope = ropes[0]
    dr = rope.shape[-1] if rope.shape else None
    if (w.ndim != 2 or not isinstance(dr, int) or dqk <= dr or w.shape[1] != h * (dqk - dr + dv)
            or rope.shape[1] != 1 or latent.shape is None or latent.shape[-1] != w.shape[0]):
        return None
    nope = dqk - dr
    per_head = w.reshape(w.shape[0], h, nope + dv)
    plan = MlaPlan(latent, rope, np.ascontiguousarray(per_head[:, :, :nope].transpose(1, 2, 0)),
                   np.ascontiguousarray(per_head[:, :, nope:].transpose(1, 0, 2)), nope)
    return plan if _mla_holds(plan, k, v) else None


def _linear_weight(node: Node) -> Optional[np.ndarray]:
    """The f32 [K, N] weight of a linear layer over constants: a MatMul's, or a `--quantize` / `--dtype`
    QuantMatMul's dequantized (the absorbed MLA weights are then computed from what the artifact stores)."""
    if node.op_type == "MatMul" and not node.domain and node.inputs[1].is_constant:
        return np.asarray(node.inputs[1].const, np.float32)      # 16-bit under --dtype on cuda / rocm
    if _is(node, "QuantMatMul") and all(v is None or v.is_constant for v in node.inputs[1:]) and len(node.inputs) < 5:
        from ..ir.fused.quant import dequantize
        consts = [v.const if v is not None else None for v in node.inputs[1:4]]
        consts += [None] * (3 - len(consts))
        return np.ascontiguousarray(dequantize(*consts, **node.attrs).T)
    return None


def _through_layout(v: Value, want) -> Optional[Node]:
    while v is not None and v.producer is not None:
        node = v.producer
        if want(node):
            return node
        if node.op_type not in _LAYOUT_OPS or node.domain:
            return None
        v = node.inputs[0]
    return None


def _leaves(v: Value, want) -> list[Value]:
    """The values matching `want` that `v` is assembled from through layout ops only ([] if anything else)."""
    found, stack, seen = [], [v], set()
    while stack:
        x = stack.pop()
        if id(x) in seen or x.const is not None:
            continue
        seen.add(id(x))
        node = x.producer
        if node is None:
            continue
        if want(node):
            found.append(x)
        elif node.op_type in _LAYOUT_OPS and not node.domain:
            stack.extend(i for i in node.inputs if i is not None)
        elif _linear_weight(node) is not None:
            continue                      # the up-projection: its slices are checked numerically
        else:
            return []
    return found


def _mla_holds(plan: MlaPlan, k: Value, v: Value) -> bool:
    from ..runtime.reference import ReferenceSession
    from .region import random_feeds, region_graph, tolerance
    inputs = [plan.latent, plan.rope]
    try:
        graphs = [region_graph(inputs, k), region_graph(inputs[:1], v)]
        rng = np.random.default_rng(0)
        binding = {s: 3 for x in inputs for s in x.type.symbols}
        feeds = random_feeds(inputs, binding, rng)
        got_k = ReferenceSession(graphs[0]).run(feeds, binding)[graphs[0].outputs[0].name]
        got_v = ReferenceSession(graphs[1]).run({plan.latent.name: feeds[plan.latent.name]}, binding)[
            graphs[1].outputs[0].name]
    except Exception:  # noqa: BLE001 - a region that cannot be cut or run is not MLA
        return False
    c = feeds[plan.latent.name].astype(np.float32).reshape(got_k.shape[0], 1, got_k.shape[2], -1)  # [B, 1, S, dc]
    want_nope = np.einsum("bxsc,hnc->bhsn", c, plan.w_uk)
    want_k = np.concatenate([want_nope, np.broadcast_to(feeds[plan.rope.name], want_nope.shape[:3] + (plan.dr,))],
                            axis=-1)
    want_v = np.einsum("bxsc,hcd->bhsd", c, plan.w_uv)
    scale = max(float(np.abs(want_k).max()), float(np.abs(want_v).max()))
    rtol = tolerance(k.dtype)        # 16-bit compute (passes/compute_dtype.py) rounds the region's products
    return (got_k.shape == want_k.shape and got_v.shape == want_v.shape
            and float(np.abs(got_k.astype(np.float32) - want_k).max()) <= rtol * scale
            and float(np.abs(got_v.astype(np.float32) - want_v).max()) <= rtol * scale)


# ---- building the programs ------------------------------------------------------------------

def _clone(graph: Graph, name: str) -> tuple[Graph, dict[int, Value]]:
    """A copy of `graph` whose constants share the arrays (and names) of the original."""
    g = Graph(name)
    g.opset_imports = dict(graph.opset_imports)
    vmap: dict[int, Value] = {}

    def copy(v: Value) -> Value:
        c = Value(v.name, v.type, const=v.const)
        g._names.add(v.name)
        vmap[id(v)] = c
        return c

    for v in graph.constants.values():
        g.constants[v.name] = copy(v)
    g.inputs = [copy(v) for v in graph.inputs]
    for node in graph.nodes:
        outs = [copy(o) for o in node.outputs]
        g._names.add(node.name)
        g.append(Node(node.op_type, [vmap[id(v)] if v is not None else None for v in node.inputs], outs,
                      node.attrs, node.domain, node.name))
    g.set_outputs([vmap[id(v)] for v in graph.outputs])
    return g, vmap


def _node(g: Graph, op: str, inputs, *, attrs=None, domain: str = "", name: str = "", before=None) -> Value:
    if domain == POLYPORT_DOMAIN:
        attrs = checked_attrs(op, attrs or {}, where=name)
    node = g.make_node(op, inputs, attrs=attrs, domain=domain, name=name, before=before)
    for v, t in zip(node.outputs, infer_node(node, g.opset_imports)):
        v.type = t
    return node.outputs[0]


def _const(g: Graph, name: str, array) -> Value:
    """A constant the derivation adds, named after its program (`decode.axis`): the programs' constants
    join the artifact's weights, so names must not collide across programs."""
    return g.add_constant(f"{g.name}.{name}", np.asarray(array))


def _program(graph: Graph, kind: str, layers: list[CacheLayer], ranges: list[Node],
             plans: dict[str, MlaPlan]) -> Graph:
    g, vmap = _clone(graph, kind)
    ids = g.inputs[0]
    ids.name = "input_ids"
    batch = ids.shape[0]
    i64 = dtypes.I64
    first = g.nodes[0]
    if kind == "prefill":
        lengths = g.add_input("lengths", TensorType(i64, (batch,)))
        n_new = lengths
        past = _node(g, "Sub", [lengths, lengths], name="zeros", before=first)
    else:
        past = g.add_input("past_len", TensorType(i64, (batch,)))
        step = _node(g, "Shape", [ids], attrs={"start": 1, "end": 2}, name="step", before=first)
        n_new = _node(g, "Expand", [step, _node(g, "Shape", [past], before=first)], name="n_new", before=first)
        n_new.type = past.type
        for r in ranges:                                  # positions continue from each sequence's cache
            arange = vmap[id(r.outputs[0])]
            users = arange.uses
            shifted = _node(g, "Add", [arange, past], name="positions", before=users[0][0])
            for user, i in users:
                user.set_input(i, shifted)
    cache_outs = []
    by_node = {layer.node: layer for layer in layers}
    for node in list(g.nodes):
        layer = by_node.get(node.name) if _is(node, "Attention") else None
        if layer is None:
            continue
        if layer.kind == "mla":
            cache_outs.append(_mla(g, kind, node, layer, plans[node.name], vmap, past, n_new))
            continue
        if layer.shapes is not None:
            cache_outs += compressed_layer(g, kind, node, plans[node.name], CompressedTensors.of(layer.name, plans[
                node.name]), vmap, past, n_new)
            continue
        q, k, v = node.inputs[:3]
        sinks = node.inputs[4] if len(node.inputs) > 4 else None
        caches = []
        for tensor, new in zip(layer.tensors, (k, v)):
            cap = layer.capacity or sym(CAPACITY)
            caches.append(g.add_input(tensor, TensorType(new.dtype, (batch, layer.kv_heads, cap, new.shape[3]))))
        ring = int(layer.capacity is not None)
        if kind == "decode":
            cache_k, cache_v = caches[0], caches[-1]
            out = _node(g, "CachedAttention", [q, k, v, cache_k, cache_v, past] + ([sinks] if sinks else []),
                        domain=POLYPORT_DOMAIN, name=f"{node.name}_cached", before=node,
                        attrs={"num_heads": node.attrs["num_heads"], "kv_heads": node.attrs["kv_heads"],
                               "scale": node.attrs["scale"], "window": attrs_of(node)["window"],
                               "softcap": attrs_of(node)["softcap"], "ring": ring,
                               "v_in_k": int(layer.kind == "shared_kv")})
            node.outputs[0].replace_all_uses_with(out)
            g.remove(node)
        for cache, new in zip(caches, (k, v)):
            upd = _node(g, "CacheUpdate", [cache, new, past, n_new], attrs={"ring": ring},
                        domain=POLYPORT_DOMAIN, name=f"{cache.name}_update")
            upd.name = g.unique_name(f"{cache.name}.out")
            cache_outs.append(upd)
    logits = _last_rows(g, g.outputs[0], n_new)
    g.set_outputs([logits] + cache_outs)
    g.remove_unused()
    g.sort()
    if any(layer.shapes is not None for layer in layers):   # the entries' ops now run on other shapes
        retype(g)
    return g


def _mla(g: Graph, kind: str, node: Node, layer: CacheLayer, plan: MlaPlan, vmap, past: Value,
         n_new: Value) -> Value:
    """Cache [c ; r] (dc + dr per token); decode in the absorbed form (prefill keeps the plain Attention:
    decompressed K/V are cheaper over a long prompt)."""
    batch = g.inputs[0].shape[0]
    latent, rope = vmap[id(plan.latent)], vmap[id(plan.rope)]
    if latent.shape is not None and len(latent.shape) == 3:
        latent = _node(g, "Unsqueeze", [latent, _const(g, "axis", [1])], before=node)        # [B, 1, S, dc]
    keys = _node(g, "Concat", [latent, rope], attrs={"axis": -1}, name="mla_keys", before=node)
    cache = g.add_input(layer.tensors[0], TensorType(keys.dtype, (batch, 1, sym(CAPACITY), layer.head_dim)))
    if kind == "decode":
        q = node.inputs[0]
        nope, total = plan.nope, q.shape[3]
        q_nope = _node(g, "Slice", [q, _const(g, "s", [0]), _const(g, "e", [nope]), _const(g, "a", [-1])], before=node)
        q_rope = _node(g, "Slice", [q, _const(g, "s", [nope]), _const(g, "e", [total]), _const(g, "a", [-1])],
                       before=node)
        w_uk = _const(g, f"{node.name}.w_uk", plan.w_uk.astype(q.dtype.numpy))
        w_uv = _const(g, f"{node.name}.w_uv", plan.w_uv.astype(q.dtype.numpy))
        q_abs = _node(g, "Concat", [_node(g, "MatMul", [q_nope, w_uk], before=node), q_rope], attrs={"axis": -1},
                      name="absorbed_q", before=node)
        out = _node(g, "CachedAttention", [q_abs, keys, latent, cache, cache, past], domain=POLYPORT_DOMAIN,
                    name=f"{node.name}_absorbed", before=node,
                    attrs={"num_heads": node.attrs["num_heads"], "kv_heads": 1, "scale": node.attrs["scale"],
                           "softcap": attrs_of(node)["softcap"], "window": 0, "ring": 0, "v_in_k": 1})
        out = _node(g, "MatMul", [out, w_uv], before=node)
        node.outputs[0].replace_all_uses_with(out)
        g.remove(node)
    upd = _node(g, "CacheUpdate", [cache, keys, past, n_new], attrs={"ring": 0}, domain=POLYPORT_DOMAIN,
                name=f"{cache.name}_update")
    upd.name = g.unique_name(f"{cache.name}.out")
    return upd


def _last_rows(g: Graph, logits: Value, n_new: Value) -> Value:
    """Logits [batch, vocab] of each sequence's last real row: the LM head runs on those rows only."""
    head = logits.producer
    one = _const(g, "one", np.array(1, np.int64))
    rows = _node(g, "Unsqueeze", [_node(g, "Sub", [n_new, one], name="last_row"), _const(g, "axis", [-1])])
    if head is not None and head.op_type == "MatMul" and not head.domain and head.inputs[1].is_constant:
        hidden = _node(g, "GatherND", [head.inputs[0], rows], attrs={"batch_dims": 1}, name="last_hidden",
                       before=head)
        head.set_input(0, hidden)
        out = logits
    else:
        logits.name = g.unique_name("all_logits")
        out = _node(g, "GatherND", [logits, rows], attrs={"batch_dims": 1}, name="last_logits")
    if out.name != "logits":
        g._names.discard("logits")
        out.name = g.unique_name("logits")
    out.type = TensorType(logits.dtype, (g.inputs[0].shape[0], logits.shape[-1]))
    return out

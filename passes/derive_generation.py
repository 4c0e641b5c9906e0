"""Derive KV-cache prefill and decode programs from a cache-less fused graph (GEN_SPEC.md).

Everything upstream of a `polyport::Attention` in a decoder layer is per token,
so the derived programs run the export's graph on the new tokens only and change
just what mixes tokens or depends on where a token sits:

- every cacheable Attention writes its new K/V into its layer's cache
  (`CacheUpdate`) and, in decode, attends over the cache (`CachedAttention`);
- the position source (the `Range(0, seq, 1)` that indexes the cos/sin tables
  of every `Rotary`) becomes `past_len + arange(step)`;
- the LM head runs on one row per sequence (the last real one).

A layer whose Attention cannot be cached (an explicit mask input, not causal)
or a softmax over the sequence left unfused is listed in `uncached`; then no programs are derived and generation recomputes
the whole sequence (the runtime warns).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..ir import dtypes
from ..ir.graph import Graph, Node, Value
from ..ir.infer import infer_node
from ..ir.ops import POLYPORT_DOMAIN
from ..ir.symbolic import sym
from ..ir.types import TensorType
from ._match_util import ints

CAPACITY = "cache_len"        # the symbolic capacity of linear caches (the runtime's max_length)


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

    @property
    def bytes_per_token(self) -> int:
        width = self.head_dim if len(self.tensors) == 1 else self.head_dim + self.v_head_dim
        return self.kv_heads * width * dtypes.from_name(self.dtype).itemsize_bits // 8

    def entry(self) -> dict:
        d = dataclasses.asdict(self)
        d["bytes_per_token"] = self.bytes_per_token
        return d


@dataclasses.dataclass
class GenerationPrograms:
    prefill: Optional[Graph]
    decode: Optional[Graph]
    layers: list[CacheLayer]
    uncached: list[str]
    vocab: int
    max_positions: Optional[int]

    def manifest(self) -> dict:
        return {"layers": [layer.entry() for layer in self.layers], "uncached": list(self.uncached),
                "vocab": self.vocab, "max_positions": self.max_positions,
                "bytes_per_token": sum(layer.bytes_per_token for layer in self.layers)}

    def describe(self) -> str:
        """The cache layout, one line per layer (what `inspect --passes generate` prints)."""
        lines = ["generation cache layout (bytes per token per layer):"]
        for layer in self.layers:
            cap = f"ring of {layer.capacity} positions" if layer.capacity else "up to max_length"
            lines.append(f"  {layer.name} ({layer.node}): {layer.kind}, {layer.kv_heads} kv heads x "
                         f"{layer.head_dim}{'' if len(layer.tensors) == 1 else f'+{layer.v_head_dim}'} "
                         f"{layer.dtype}, {cap}: {layer.bytes_per_token} B/token")
        for name in self.uncached:
            lines.append(f"  {name}: NOT cached (generation recomputes the whole sequence)")
        return "\n".join(lines)


def generation_entry(graph: Graph, programs: GenerationPrograms) -> dict:
    """The manifest's `generation` entry: the layout plus the programs' batch (1 when the export's is static 1)."""
    shape = graph.inputs[0].shape if graph.inputs else None
    return {**programs.manifest(), "batch": shape[0] if shape and isinstance(shape[0], int) else None}


def derive_generation(graph: Graph) -> GenerationPrograms:
    """The prefill and decode programs of a fused graph (the graph itself is left unchanged)."""
    attentions = [n for n in graph.nodes if _is(n, "Attention")]
    ids = graph.inputs[0]
    vocab = _vocab(graph)
    uncached = [n.name for n in attentions if not _cacheable(n)] + _unfused_attention(graph)
    ranges = _position_sources(graph)
    batch = ids.shape[0] if ids.shape else None
    if ranges and batch != 1:
        uncached = uncached or [n.name for n in attentions]   # positions [batch, step] need a batched arange
    if len(graph.inputs) != 1 or not attentions or any(True for n in graph.nodes for _ in n.subgraphs()):
        uncached = uncached or [n.name for n in attentions] or [graph.name]
    layers = [_layer(i, n) for i, n in enumerate(attentions) if n.name not in uncached]
    if uncached:
        return GenerationPrograms(None, None, [], uncached, vocab, None)
    return GenerationPrograms(_program(graph, "prefill", layers, ranges), _program(graph, "decode", layers, ranges),
                              layers, [], vocab, None)


def _is(node: Node, op: str) -> bool:
    return node.domain == POLYPORT_DOMAIN and node.op_type == op


def _cacheable(node: Node) -> bool:
    ins = node.inputs
    mask = ins[3] if len(ins) > 3 else None
    shapes = [v.shape for v in ins[:3]]
    return (bool(node.attrs.get("causal", 0)) and mask is None
            and all(s is not None and len(s) == 4 and isinstance(s[1], int) and isinstance(s[3], int)
                    for s in shapes))


def _unfused_attention(graph: Graph) -> list[str]:
    """Softmaxes over a sequence-long axis left outside `Attention` (DeepSeek V4's compressed
    layers): attention that mixes tokens in a way no cache layout here captures."""
    seq = graph.inputs[0].type.symbols if isinstance(graph.inputs[0].type, TensorType) else frozenset()
    out = []
    for n in graph.nodes:
        shape = n.inputs[0].shape if n.op_type == "Softmax" and not n.domain else None
        if shape and not isinstance(shape[-1], int) and (shape[-1] is None or shape[-1].symbols & seq):
            out.append(n.name)
    return out


def _layer(i: int, node: Node) -> CacheLayer:
    q, k, v = node.inputs[:3]
    window = int(node.attrs.get("window", 0))
    shared = k is v
    name = f"cache.{i}"
    kind = "shared_kv" if shared else ("window" if window else "mha")
    tensors = [f"{name}.kv"] if shared else [f"{name}.k", f"{name}.v"]
    return CacheLayer(name, node.name, kind, tensors, k.shape[1], k.shape[3], v.shape[3], window or None,
                      str(k.dtype))


def _vocab(graph: Graph) -> int:
    shape = graph.outputs[0].shape
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
        if node.op_type == "Range" and not node.domain and ints(node.inputs[0]) == [0] and ints(node.inputs[2]) == [1]:
            found.append(node)
            continue
        stack.extend(node.inputs)
    return found


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
    node = g.make_node(op, inputs, attrs=attrs, domain=domain, name=name, before=before)
    for v, t in zip(node.outputs, infer_node(node, g.opset_imports)):
        v.type = t
    return node.outputs[0]


def _const(g: Graph, name: str, array) -> Value:
    return g.add_constant(name, np.asarray(array))


def _program(graph: Graph, kind: str, layers: list[CacheLayer], ranges: list[Node]) -> Graph:
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
                               "scale": node.attrs["scale"], "window": int(node.attrs.get("window", 0)),
                               "ring": ring, "v_in_k": int(layer.kind == "shared_kv")})
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
    return g


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

"""Decode state for DeepSeek V4's compressed attention layers (CSA / HCA), by meaning.

A compressed layer's `Attention` (shared K = V, masked, not `causal`) attends over
`Concat(window keys [B, 1, S, D], entries [B, 1, S // rate, D])` with the mask
`Concat(window mask, entries mask)`: the window mask is a causal sliding window
(checked by running it, passes/attention_mask.py); the entries mask either shows
entry t to the query at position p once its window is complete, t < (p + 1) // rate
(HCA: checked by running it), or is a `SparseIndexer` (CSA: that rule plus the
indexer's top-k over its own compressed keys). Each entry comes from a
`KVCompress` over the raw kv / gate projections, then per-entry ops (RMSNorm,
rotary at position t x rate) whose positions are a `Range(0, S // rate)`.

Caches per layer (`compressed_tensors`):
- `.kv`: the window keys, a ring of `window` slots (as a sliding layer's);
- `.entries` (and CSA's `.index`): one row per `rate` tokens, up to max_length;
- `.kv_raw` / `.gate_raw` per compressor (CSA: also `.index_kv_raw` / `.index_gate_raw`):
  rings of the raw projections of the last rate x (1 + overlap) tokens, the tail not yet
  compressed (and, CSA, the previous window its entries overlap).

Decode takes one token per step (the runtime splits longer appends): the token's raw rows go into
the rings, its window w = p // rate is pooled again from the rings by the same `KVCompress`
(positions past p get no weight), the export's per-entry ops run on that one entry at position w
(the Range becomes w), and the result is written into entry slot w. An unfinished entry is
invisible: the mask shows entry t only once t < (p + 1) // rate. The layer's own `Attention` (not causal,
masked) then attends over Concat(the window ring after this step's write, the entries) with the mask
Concat(slots written so far, complete entries / CSA's indexer over its cached keys): standard ops and
the fused ops every target already lowers.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.ops import POLYPORT_DOMAIN
from ..ir.symbolic import sym
from ..ir.types import TensorType
from .attention_mask import MaskPart, _causal_window, _Runner
from .pattern import NoMatch
from .region import region_nodes

HIDDEN_GATE = -1e30        # an unwritten slot's gate: no weight, yet no NaN in the discarded leading entry
SEARCH_LIMIT = 200        # nodes between a compressed layer's keys and its KVCompress


@dataclasses.dataclass
class Compressor:
    """One KVCompress feeding a compressed layer, and the per-entry ops after it."""
    node: Node                # KVCompress(kv [B, S, C], gate [B, S, C], position_bias)
    entries: Value            # the entries the layer uses: [B, 1, T, D] (keys) or [B, T, Dq] (indexer keys)
    ranges: list[Node]        # Range(0, T, 1): the entries' positions (x rate inside the chain)

    @property
    def rate(self) -> int:
        return int(self.node.attrs["rate"])

    @property
    def ring(self) -> int:
        """Raw rows kept: the window being filled plus, with overlap, the previous one."""
        return self.rate * (1 + int(self.node.attrs.get("overlap", 0)))

    @property
    def channels(self) -> int:
        return int(self.node.inputs[0].shape[2])


@dataclasses.dataclass
class CompressedPlan:
    kind: str                           # hca | csa
    window: int                         # the window keys' sliding window (0: every past key)
    keys: Value                         # the window keys [B, 1, S, D]
    main: Compressor
    index: Optional[Compressor] = None  # CSA: the indexer's compressor
    indexer: Optional[Node] = None      # CSA: the SparseIndexer making the entries' mask

    @property
    def rate(self) -> int:
        return self.main.rate

    def compressors(self) -> list[tuple[str, Compressor]]:
        return [("", self.main)] + ([("index_", self.index)] if self.index is not None else [])

    @property
    def ranges(self) -> list[Node]:
        return [r for _, c in self.compressors() for r in c.ranges]


def compressed_plan(node: Node) -> Optional[CompressedPlan]:
    """The plan of a compressed layer's Attention, or None when it is not one (or not understood)."""
    try:
        return _plan(node)
    except (NoMatch, ValueError):
        return None


def _concat(v: Optional[Value], axes: tuple[int, ...]) -> Optional[list[Value]]:
    node = v.producer if v is not None else None
    if node is None or node.op_type != "Concat" or node.domain or node.attrs.get("axis") not in axes \
            or len(node.inputs) != 2:
        return None
    return list(node.inputs)


def _plan(node: Node) -> Optional[CompressedPlan]:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    keys = _concat(k, (2, -2))
    masks = _concat(mask, (3, -1))
    if k is not v or keys is None or masks is None or node.attrs.get("causal"):
        return None
    window_keys, entries = keys
    if window_keys.shape is None or window_keys.shape[2] != q.shape[2]:
        return None
    main = _compressor(entries)
    causal, window = _causal_window([MaskPart("add", masks[0])], masks[0])
    if not causal:
        return None
    indexer = masks[1].producer
    if indexer is not None and indexer.domain == POLYPORT_DOMAIN and indexer.op_type == "SparseIndexer":
        index = _compressor(indexer.inputs[1])
        if index.rate != main.rate or indexer.attrs["rate"] != main.rate:
            return None
        return CompressedPlan("csa", window, window_keys, main, index, indexer)
    _check_complete_entries(masks[1], main.rate)
    return CompressedPlan("hca", window, window_keys, main)


def _compressor(entries: Value) -> Compressor:
    """The KVCompress behind `entries` and the Ranges (positions) of the per-entry ops in between."""
    found, seen, stack = [], set(), [entries]
    while stack:
        x = stack.pop()
        node = x.producer
        if x.const is not None or node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.domain == POLYPORT_DOMAIN and node.op_type == "KVCompress":
            found.append(node)
        elif len(seen) > SEARCH_LIMIT:
            raise NoMatch(f"no KVCompress within {SEARCH_LIMIT} nodes of %{entries.name}")
        else:
            stack.extend(i for i in node.inputs if i is not None)
    if len(found) != 1:
        raise NoMatch(f"{len(found)} KVCompress behind %{entries.name}")
    kvc = found[0]
    chain = region_nodes([kvc.outputs[0]], entries)
    ranges = [n for n in chain if n.op_type == "Range" and not n.domain]
    between = region_nodes([kvc.outputs[0]] + [r.outputs[0] for r in ranges], entries)
    if any(n.op_type in ("Range", "Shape", "ShapeValue", "Size") for n in between):
        raise NoMatch(f"the entries %{entries.name} depend on the sequence's shape besides their positions")
    from .derive_generation import _arange
    if not all(_arange(r) for r in ranges):
        raise NoMatch("the entries' positions are not a Range(0, n, 1)")
    return Compressor(kvc, entries, ranges)


def _check_complete_entries(mask: Value, rate: int) -> None:
    """HCA: the entries' mask shows entry t to query p exactly when t < (p + 1) // rate."""
    runner = _Runner(MaskPart("add", mask))
    for n in (rate, rate + 1, 2 * rate + 3, 5 * rate + 1):     # lengths with at least one entry
        keep = runner.keep(n, mask)
        want = np.arange(keep.shape[1])[None, :] < ((np.arange(n) + 1) // rate)[:, None]
        if keep.shape != want.shape or not np.array_equal(keep, want):
            raise NoMatch(f"the entries' mask %{mask.name} does not show the complete windows")


# ---- the programs ------------------------------------------------------------------------------


@dataclasses.dataclass
class CompressedTensors:
    """Cache input names of one compressed layer."""
    kv: str
    entries: str
    index: Optional[str]
    raw: dict[str, tuple[str, str]]     # compressor prefix -> (kv ring, gate ring)

    @classmethod
    def of(cls, name: str, plan: CompressedPlan) -> "CompressedTensors":
        return cls(f"{name}.kv", f"{name}.entries", f"{name}.index" if plan.index is not None else None,
                   {p: (f"{name}.{p}kv_raw", f"{name}.{p}gate_raw") for p, _ in plan.compressors()})

    def names(self) -> list[str]:
        return [self.kv, self.entries] + ([self.index] if self.index else []) + [n for r in self.raw.values()
                                                                                  for n in r]


def entry_slots(rate: int):
    """The entries caches' rows, a symbol of their own (the runtime reserves ceil(max_length / rate)): a
    cache's shape binds it directly, as `cache_len` binds a linear cache's."""
    return sym(f"entries_len_{rate}")


def compressed_layer(g: Graph, kind: str, node: Node, plan: CompressedPlan, names: CompressedTensors, vmap,
                     past: Value, n_new: Value) -> list[Value]:
    """Rewrite the clone of a compressed layer (Attention `node` in program `g`) to fill (prefill) or read and
    extend (decode, one token per step) its caches; returns the updated caches."""
    from .derive_generation import CAPACITY, _const, _node
    batch = g.inputs[0].shape[0]
    rate = plan.rate
    keys = vmap[id(plan.keys)]
    d = keys.shape[3]
    ring = int(bool(plan.window))

    def cache(name: str, value: Value, slots, dim) -> Value:
        return g.add_input(name, TensorType(value.dtype, (batch, 1, slots, dim)))

    def update(cache_in: Value, new: Value, at: Value, count: Value, in_ring: int) -> Value:
        out = _node(g, "CacheUpdate", [cache_in, new, at, count], attrs={"ring": in_ring},
                    domain=POLYPORT_DOMAIN, name=f"{cache_in.name}_update")
        out.name = g.unique_name(f"{cache_in.name}.out")
        outs.append(out)
        return out

    def rows(x: Value) -> Value:                            # [B, S, C] -> [B, 1, S, C]
        return _node(g, "Unsqueeze", [x, _const(g, "axis", [1])], before=node)

    outs: list[Value] = []
    slots = entry_slots(rate)
    kv_cache = cache(names.kv, keys, plan.window or sym(CAPACITY), d)
    entries_cache = cache(names.entries, keys, slots, d)
    index_cache = None
    if plan.index is not None:
        idx = vmap[id(plan.index.entries)]
        index_cache = cache(names.index, idx, slots, idx.shape[-1])
    rate_c = _const(g, "rate", np.array(rate, np.int64))
    if kind == "prefill":
        update(kv_cache, keys, past, n_new, ring)
        complete = _node(g, "Div", [n_new, rate_c], name="complete_entries")
        update(entries_cache, vmap[id(plan.main.entries)], past, complete, 0)
        if index_cache is not None:
            update(index_cache, rows(vmap[id(plan.index.entries)]), past, complete, 0)
        for prefix, comp in plan.compressors():
            for tensor, raw in zip(names.raw[prefix], comp.node.inputs[:2]):
                raw = vmap[id(raw)]
                update(cache(tensor, raw, comp.ring, comp.channels), rows(raw), past, n_new, 1)
        return _in_order(outs, names)
    w = _node(g, "Div", [past, rate_c], name="entry", before=node)          # the entry the new token belongs to
    for prefix, comp in plan.compressors():
        tails = [update(cache(tensor, vmap[id(raw)], comp.ring, comp.channels), rows(vmap[id(raw)]), past, n_new, 1)
                 for tensor, raw in zip(names.raw[prefix], comp.node.inputs[:2])]
        entry = _pool_window(g, comp, vmap[id(comp.node.inputs[2])], *tails, past, w, node)
        vmap[id(comp.node.outputs[0])].replace_all_uses_with(entry)
        for r in comp.ranges:                               # the per-entry ops see entry w's position
            vmap[id(r.outputs[0])].replace_all_uses_with(w)
    entries = update(entries_cache, vmap[id(plan.main.entries)], w, n_new, 0)
    ahead = _node(g, "Add", [past, _const(g, "one", np.array(1, np.int64))], before=node)    # p + 1
    if index_cache is not None:
        indexed = update(index_cache, rows(vmap[id(plan.index.entries)]), w, n_new, 0)
        indexer = vmap[id(plan.indexer.outputs[0])].producer
        indexer.set_input(1, _node(g, "Squeeze", [indexed, _const(g, "axis", [1])], before=indexer))
        entries_mask = indexer.outputs[0]                     # [B, 1, 1, T]: complete entries, top-k
    else:
        ready = _node(g, "Div", [ahead, rate_c], before=node)  # entry t is complete once t < (p + 1) // rate
        entries_mask = _shown(g, _slot_numbers(g, entries, node), ready, node)
    window = update(kv_cache, keys, past, n_new, ring)         # the ring now holds the query's window
    window_mask = _shown(g, _slot_numbers(g, window, node), ahead, node)   # slots written so far
    if index_cache is not None:                                # [B, 1, 1, W] -> [B, 1, step, W], as the indexer's
        q = node.inputs[0]
        queries = _node(g, "ShapeValue", [], attrs={"dims": [batch, 1, q.shape[2], 1], "scalar": 0},
                        domain=POLYPORT_DOMAIN, before=node)
        window_mask = _node(g, "Expand", [window_mask, queries], before=node)
    both = _node(g, "Concat", [window, entries], attrs={"axis": 2}, before=node)
    mask = _node(g, "Concat", [window_mask, entries_mask], attrs={"axis": -1}, before=node)
    node.set_input(1, both)
    node.set_input(2, both)
    node.set_input(3, mask)           # the export's Attention (causal 0) over the cached window and entries
    return _in_order(outs, names)


def _in_order(outs: list[Value], names: CompressedTensors) -> list[Value]:
    """The updated caches in the order of the cache inputs (runtimes pair them by position)."""
    order = names.names()
    return sorted(outs, key=lambda v: order.index(v.producer.inputs[0].name))


def _slot_numbers(g: Graph, cache: Value, before: Node) -> Value:
    """arange(slots) [slots] of a cache [B, H, slots, D] (slots: a ring's count or a symbolic capacity)."""
    from .derive_generation import _const, _node
    count = _node(g, "ShapeValue", [], attrs={"dims": [cache.shape[2]], "scalar": 1}, domain=POLYPORT_DOMAIN,
                  before=before)
    return _node(g, "Range", [_const(g, "zero", np.array(0, np.int64)), count,
                              _const(g, "one", np.array(1, np.int64))], before=before)


def _shown(g: Graph, slots: Value, limit: Value, before: Node) -> Value:
    """The additive mask [B, 1, 1, slots]: 0 where slot < limit[b], else -inf."""
    from .derive_generation import _const, _node
    keep = _node(g, "Less", [slots, _node(g, "Unsqueeze", [limit, _const(g, "axis", [-1])], before=before)],
                 before=before)
    shown, hidden = _const(g, "shown", np.float32(0)), _const(g, "hidden", np.float32(-np.inf))
    add = _node(g, "Where", [keep, shown, hidden], before=before)
    return _node(g, "Unsqueeze", [add, _const(g, "axes", [1, 2])], before=before)


def _pool_window(g: Graph, comp: Compressor, bias: Value, kv_tail: Value, gate_tail: Value, past: Value,
                 w: Value, before: Node) -> Value:
    """Entry w [B, 1, D] pooled from the raw rings (rate x (1 + overlap) slots, position p in slot
    p % slots): the window's positions after the new token (and before 0) get a -1e30 gate (no weight)."""
    from .derive_generation import _const, _node
    span, rate = comp.ring, comp.rate
    n_windows = span // rate

    def op(name: str, inputs, **attrs) -> Value:
        return _node(g, name, inputs, attrs=attrs or None, before=before)

    first = op("Mul", [op("Sub", [w, _const(g, "overlap", np.array(n_windows - 1, np.int64))]),
                       _const(g, "rate", np.array(rate, np.int64))])
    positions = op("Add", [op("Unsqueeze", [first, _const(g, "axis", [-1])]),
                           _const(g, "span", np.arange(span, dtype=np.int64))])                  # [B, span]
    slots = op("Mod", [positions, _const(g, "slots", np.array(span, np.int64))], fmod=0)
    written = op("And", [op("GreaterOrEqual", [positions, _const(g, "zero", np.array(0, np.int64))]),
                         op("LessOrEqual", [positions, op("Unsqueeze", [past, _const(g, "axis", [-1])])])])
    index = op("Unsqueeze", [slots, _const(g, "axis", [-1])])

    def window(tail: Value) -> Value:                       # [B, 1, span, C] -> [B, span, C] in position order
        return op("GatherND", [op("Squeeze", [tail, _const(g, "axis", [1])]), index], batch_dims=1)

    gate = window(gate_tail)
    hidden = _const(g, "no_gate", np.array(HIDDEN_GATE, gate.dtype.numpy))
    gate = op("Where", [op("Unsqueeze", [written, _const(g, "axis", [-1])]), gate, hidden])
    pooled = _node(g, "KVCompress", [window(kv_tail), gate, bias], domain=POLYPORT_DOMAIN,
                   attrs=dict(comp.node.attrs), before=before)                                   # [B, n_windows, D]
    return op("Slice", [pooled, _const(g, "s", [n_windows - 1]), _const(g, "e", [n_windows]), _const(g, "a", [1])])

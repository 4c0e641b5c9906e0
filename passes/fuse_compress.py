"""fuse-compress: DeepSeek-V4's compressor and sparse indexer -> polyport::KVCompress, polyport::SparseIndexer.

KVCompress
- anchor: a Softmax over axis 2 of a rank-4 gate [B, T, W, C'] whose result multiplies a rank-4 kv
  and is summed over axis 2 (keepdims 0): the pooled entries [B, T, D].
- operands by meaning: kv and gate are the rank-3 [B, seq, C] tensors the two sides are cut from
  (walking back through the window layout: slices, reshapes, concats with constants); the
  position bias is the [rate, C] constant added on the gate side. W = rate (HCA) or 2 x rate with
  C = 2D (CSA's overlapping windows).
SparseIndexer
- anchor: a TopK whose indices end, through where/scatter, in a float mask [B, 1, S, T].
- operands by meaning: below the TopK, relu(q @ k^T) (q [B, S, H, Dq], k [B, T, Dq] behind layout
  ops) times per-head weights [B, S, H] (behind an Unsqueeze) and scalar constants (the scale);
  the query positions are the integer [B|1, S] tensor every integer value of the region comes from;
  the rate is that of k's length (seq // rate); top_k is the TopK's k.
Both: then `equivalent` (the region and the fused op agree on random inputs at several lengths).
"""
from __future__ import annotations

from typing import Optional

from ..ir.graph import Graph, Node, Value
from ..ir.symbolic import Atom, SymExpr
from ._match_util import ints, rank, scalar
from .manager import PassResult, register_pass
from .pattern import NoMatch
from .region import equivalent, region_nodes, replace_with_fused

LAYOUT = ("Transpose", "Unsqueeze", "Squeeze", "Reshape")
SEARCH_LIMIT = 64          # nodes a backward walk may visit before it gives up


def _axes(node: Node) -> Optional[list[int]]:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    return ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None


def _is_seq_dim(d) -> bool:
    """A dim of the token axis: symbolic and free of floor divisions (not a count of windows)."""
    return isinstance(d, SymExpr) and d.is_polynomial and bool(d.symbols)


def _sources(v: Value, want) -> list[Value]:
    """The values behind `v` (walking back through producers) that satisfy `want`; constants and
    shape values are not walked into."""
    found, seen, stack, visited = [], set(), [v], 0
    while stack:
        x = stack.pop()
        if id(x) in seen or x.const is not None:
            continue
        seen.add(id(x))
        if want(x):
            found.append(x)
            continue
        node = x.producer
        if node is None:
            raise NoMatch(f"%{x.name} is a graph input on the way back from %{v.name}")
        visited += 1
        if visited > SEARCH_LIMIT:
            raise NoMatch(f"no source within {SEARCH_LIMIT} nodes of %{v.name}")
        stack.extend(i for i in node.inputs if i is not None)
    return found


def _one(values: list[Value], what: str) -> Value:
    if len(values) != 1:
        raise NoMatch(f"{len(values)} candidates for {what}")
    return values[0]


# ---- KVCompress -------------------------------------------------------------------------------------
def _token_tensor(x: Value) -> bool:
    return x.dtype is not None and x.dtype.is_float and rank(x) == 3 and _is_seq_dim(x.shape[1])


def _position_bias(gate: Value, scores: Value, rate: int, c: int) -> Value:
    """The [rate, c] constant added between the gate and the softmax."""
    for node in region_nodes([gate], scores):
        if node.op_type != "Add" or node.domain:
            continue
        for b in node.inputs:
            if b is not None and b.const is not None and b.const.size == rate * c and b.shape[-1] == c:
                if tuple(b.shape) != (rate, c):
                    b = node.graph.add_constant(f"{b.name}_2d", b.const.reshape(rate, c))
                return b
    raise NoMatch(f"no [{rate}, {c}] position bias added to the gate")


def _fuse_compress(softmax: Node) -> None:
    scores = softmax.inputs[0]
    users = softmax.outputs[0].users
    if len(users) != 1 or users[0].op_type != "Mul":
        raise NoMatch("its result is not multiplied by the pooled values")
    mul = users[0]
    kv4 = mul.inputs[1] if mul.inputs[0] is softmax.outputs[0] else mul.inputs[0]
    sums = mul.outputs[0].users
    if len(sums) != 1 or sums[0].op_type != "ReduceSum" or _axes(sums[0]) not in ([2], [-2]) \
            or sums[0].attrs.get("keepdims", 1) != 0:
        raise NoMatch("the product is not summed over axis 2")
    out = sums[0].outputs[0]
    kv = _one(_sources(kv4, _token_tensor), "the kv tensor")
    gate = _one(_sources(scores, _token_tensor), "the gate tensor")
    width, c, d = scores.shape[2], kv.shape[2], out.shape[2]
    if not all(isinstance(x, int) for x in (width, c, d)) or gate.shape[2] != c:
        raise NoMatch(f"window width {width}, channels {c} -> {d}: not static, or kv and gate differ")
    overlap = c == 2 * d and width % 2 == 0
    rate = width // 2 if overlap else width
    attrs = {"rate": rate, "overlap": int(overlap)}
    bias = _position_bias(gate, scores, rate, c)
    try:
        equivalent([kv, gate], out, "KVCompress", [kv, gate, bias], attrs)
    except NoMatch as e:
        raise NoMatch(f"not equivalent to KVCompress {attrs}: {e}") from None
    replace_with_fused(out, "KVCompress", [kv, gate, bias], attrs)


# ---- SparseIndexer ----------------------------------------------------------------------------------
def _below(value: Value, limit: int = 12, stops: frozenset = frozenset()):
    """The nodes computing `value` (not walking past the values whose ids are in `stops`), nearest
    first (breadth first)."""
    frontier, seen = [value], set()
    for _ in range(limit):
        nxt = []
        for v in frontier:
            node = v.producer
            if node is None or id(node) in seen or id(v) in stops:
                continue
            seen.add(id(node))
            yield node
            nxt.extend(i for i in node.inputs if i is not None and i.const is None)
        frontier = nxt


def _layout_root(v: Value, ok) -> Optional[Value]:
    """The first value satisfying `ok` walking back from `v` through layout ops."""
    while v is not None:
        if ok(v):
            return v
        node = v.producer
        if node is None or node.op_type not in LAYOUT or node.domain:
            return None
        v = node.inputs[0]
    return None


def _between(first: Node, last: Node) -> list[Node]:
    """The nodes on the paths from `first` to `last` (the scores' chain from the relu to the TopK: only
    its multipliers are the scale and the head weights)."""
    before_last = {id(n) for n in _below(last.inputs[0])}
    found, frontier, seen = [], [first], set()
    while frontier:
        node = frontier.pop()
        for user in (u for o in node.outputs for u in o.users):
            if id(user) in before_last and id(user) not in seen:
                seen.add(id(user))
                found.append(user)
                frontier.append(user)
    return found


def _window_rate(t) -> Optional[int]:
    """k in a length `seq // k`."""
    if isinstance(t, SymExpr) and len(t.terms) == 1:
        (mono, coeff), = t.terms.items()
        if coeff == 1 and len(mono) == 1 and isinstance(mono[0], Atom) and mono[0].kind == "floordiv":
            rate = mono[0].args[1]
            return rate if isinstance(rate, int) else None
    return None


def _mask_output(topk: Node) -> Value:
    """The float [B, 1, S, T] mask the TopK's indices end in (following users forward)."""
    frontier = [topk.outputs[1]]
    for _ in range(8):
        nxt = []
        for v in frontier:
            for user in v.users:
                for o in user.outputs:
                    if o.dtype is not None and o.dtype.is_float and rank(o) == 4 and o.shape[1] == 1:
                        if user.op_type == "ScatterElements":
                            nxt_users = o.users
                            if len(nxt_users) == 1 and nxt_users[0].op_type == "Slice":
                                return nxt_users[0].outputs[0]
                        return o
                    nxt.append(o)
        frontier = nxt
    raise NoMatch("its indices make no [B, 1, S, T] mask")


def _fuse_indexer(topk: Node) -> None:
    k_const = ints(topk.inputs[1]) if len(topk.inputs) > 1 else None
    if k_const is None or len(k_const) != 1 or topk.attrs.get("largest", 1) != 1:
        raise NoMatch("not a largest-k TopK with a constant k")
    out = _mask_output(topk)
    relu = next((n for n in _below(topk.inputs[0]) if n.op_type == "Relu" and not n.domain), None)
    mm = relu.inputs[0].producer if relu is not None else None
    if mm is None or mm.op_type != "MatMul":
        raise NoMatch("no relu(q @ k^T) below the TopK")
    q = mm.inputs[0]
    if rank(q) != 4 or not isinstance(q.shape[3], int):
        raise NoMatch(f"q is {q.type}, not [B, S, H, Dq]")
    dq = q.shape[3]
    k = _layout_root(mm.inputs[1], lambda v: rank(v) == 3 and v.shape[2] == dq and v.shape[1] != dq)
    rate = _window_rate(k.shape[1]) if k is not None else None
    if rate is None:
        raise NoMatch("the keys are not [B, seq // rate, Dq] behind layout ops")
    scale, weights, seq = 1.0, None, q.shape[1]
    for node in _between(relu, topk):
        if node.op_type != "Mul" or node.domain:
            continue
        for a in node.inputs:
            c = scalar(a) if a is not None and a.const is not None else None
            if c is not None:
                scale *= c
            elif a is not None and a.producer is not None and a.producer.op_type == "Unsqueeze" \
                    and rank(a.producer.inputs[0]) == 3 and a.producer.inputs[0].shape[1] == seq:
                weights = a.producer.inputs[0]
    if weights is None:
        raise NoMatch("no per-head weights [B, S, H] multiply the scores")

    def is_position(v: Value) -> bool:
        return v.dtype is not None and v.dtype.is_integer and rank(v) == 2 and v.shape[1] == seq

    stops = frozenset((id(q), id(k), id(weights)))
    ints_seen = [v for n in _below(out, 40, stops) for v in n.inputs
                 if v is not None and id(v) not in stops and v.const is None and is_position(v)]
    candidates = {id(v): v for v in ints_seen}
    roots = {i: v for i, v in candidates.items()
             if not any(id(x) in candidates for n in _below(v, 40, stops) for x in n.inputs if x is not None)}
    positions = _one(list(roots.values()), "the query positions")
    attrs = {"top_k": k_const[0], "rate": rate, "scale": float(scale)}
    operands = [q, k, weights, positions]
    try:
        # positions drawn inside the sequence, as the export's own positions are
        equivalent(operands, out, "SparseIndexer", operands, attrs, int_high={positions.name: seq})
    except NoMatch as e:
        raise NoMatch(f"not equivalent to SparseIndexer {attrs}: {e}") from None
    replace_with_fused(out, "SparseIndexer", operands, attrs)


@register_pass("fuse-compress")
def fuse_compress(graph: Graph) -> PassResult:
    """V4's compressor pooling -> polyport::KVCompress; its indexer's top-k mask -> polyport::SparseIndexer."""
    result = PassResult()
    for node in list(graph.nodes):
        if node.graph is not graph or node.domain or node.op_type not in ("Softmax", "TopK"):
            continue
        if node.op_type == "Softmax" and (rank(node.inputs[0]) != 4 or node.attrs.get("axis", -1) not in (2, -2)):
            continue                    # not a pooling over the slots of a window: no note
        try:
            if node.op_type == "Softmax":
                _fuse_compress(node)
                result.count("KVCompress")
            else:
                _fuse_indexer(node)
                result.count("SparseIndexer")
        except NoMatch as e:
            result.notes.append(f"{node.name}: {e}")
    graph.remove_unused()
    return result

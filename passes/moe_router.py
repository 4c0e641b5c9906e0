"""MoE routers: read what a router means off the graph, starting at the experts it selects.

A router, whatever chain the exporter wrote for it, is

    logits  = x @ W (+ b)                  (MatMul, or Gemm with W transposed and maybe a bias)
    scores  = softmax | sigmoid | sqrt(softplus) (logits)
    idx     = top_k(scores + e_bias)       (optionally limited to the best groups)
              or table[token_ids]          (hash routing: a fixed token -> experts table)
    weights = scores[idx]                  (optionally renormalised, then scaled)

`analyze_router(selection, idx)` starts at the selected expert indices (a TopK's
index output, a constant-table lookup, or PhiMoE's SparseMixer: the Concat of an
ArgMax of the logits and an ArgMax of the logits with that choice scattered to
-inf) and walks back to the logits and
forward to the routing weights the combine reads. It returns a `Router`, or
raises `NoMatch` with the reason. The scoring function is identified by what it
computes (the logits -> scores region run on random logits), not by its spelling:
torch writes softplus as Where(x > 20, x, Softplus(x)), others write Log(1 + Exp).
The whole block is checked against polyport::MoE afterwards (fuse_moe.py); this
module only proposes the attributes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..ir import dtypes
from ..ir.fused.moe import SCORING
from ..ir.graph import Node, Value
from ..ir.ops import known_value
from .pattern import NoMatch
from .region import tolerance

# Ops that only reshape a tensor of expert indices (or routing weights) without changing its values.
INDEX_SHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Cast", "Identity"})

_MASK_FILL_MAX = -1e30       # a group mask must push unselected experts below every real score
_MAX_SCORING_NODES = 24      # logits -> scores is a handful of elementwise ops, never a whole network


@dataclasses.dataclass
class Router:
    x: Value                      # the hidden states the router reads, [..., H]
    logits: Value
    router_w: np.ndarray          # [H, E]
    router_w_value: Optional[Value]   # the graph constant holding router_w as is, when there is one
    scores: Value
    scoring: str
    indices: Value                # selected experts, [..., top_k]
    weights: Value                # routing weights as the combine reads them, [..., top_k]
    top_k: int
    e_bias: Optional[Value] = None
    n_group: int = 1
    topk_group: int = 1
    renormalize: int = 0
    routed_scaling: float = 1.0
    hash_table: Optional[Value] = None
    token_ids: Optional[Value] = None
    weight_gathers: tuple[Node, ...] = ()   # GatherElements(scores, idx) nodes
    router_b: Optional[Value] = None        # the Gemm's constant bias [E] (gpt-oss)
    routing: str = "topk"                   # or "sparsemixer" (PhiMoE)
    jitter_eps: float = 0.0

    @property
    def num_experts(self) -> int:
        return int(self.router_w.shape[1])

    def attrs(self) -> dict:
        extra = {"routing": self.routing, "jitter_eps": float(self.jitter_eps)} if self.routing != "topk" else {}
        return {"top_k": self.top_k, "scoring": self.scoring, "n_group": self.n_group,
                "topk_group": self.topk_group, "renormalize": self.renormalize,
                "routed_scaling": float(self.routed_scaling), **extra}


# ---- small helpers ---------------------------------------------------------------------------

def const_of(v: Optional[Value]) -> Optional[np.ndarray]:
    """The numeric constant behind `v` (None for non-constants and symbolic shape vectors)."""
    arr = known_value(v)
    return None if arr is None or arr.dtype == object else arr


def scalar_of(v: Optional[Value]) -> Optional[float]:
    """The one number a constant holds (all elements equal), else None."""
    arr = const_of(v)
    if arr is None or arr.size == 0:
        return None
    flat = arr.reshape(-1).astype(np.float64)
    return float(flat[0]) if np.all(flat == flat[0]) else None


def is_float(arr: np.ndarray) -> bool:
    """A floating-point array, bf16 and fp8 included (NumPy's own test misses ml_dtypes)."""
    try:
        return dtypes.from_numpy(arr.dtype).is_float
    except dtypes.UnknownDType:
        return False


def axis_is_last(node: Node, rank: Optional[int], default: int = -1) -> bool:
    axis = node.attrs.get("axis", default)
    return axis == -1 or (rank is not None and axis == rank - 1)


def reduce_axes(node: Node) -> Optional[list[int]]:
    """The axes of a Reduce* node (opset 18+: an input; earlier: an attribute)."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_of(node.inputs[1])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def reduces_last_axis(node: Node, rank: Optional[int]) -> bool:
    axes = reduce_axes(node)
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _rank(v: Value) -> Optional[int]:
    return None if v.shape is None else len(v.shape)


def _only_user(v: Value) -> Optional[Node]:
    users = v.users
    return users[0] if len(users) == 1 and not v.is_graph_output else None


# ---- candidates ------------------------------------------------------------------------------

def table_lookup(node: Node) -> Optional[Value]:
    """The token-id operand of a lookup in a constant integer [vocab, k] table (hash routing)."""
    if node.domain or node.op_type not in ("Gather", "GatherND"):
        return None
    table, ids = const_of(node.inputs[0]), node.inputs[1]
    if table is None or table.ndim != 2 or not np.issubdtype(table.dtype, np.integer) or ids.const is not None:
        return None
    if node.op_type == "Gather":
        return ids if node.attrs.get("axis", 0) == 0 else None
    if node.attrs.get("batch_dims", 0) != 0 or ids.shape is None or ids.shape[-1] != 1:
        return None
    prod = ids.producer     # GatherND(table, Unsqueeze(ids, -1)) == table[ids]
    if prod is not None and prod.op_type == "Unsqueeze" and not prod.domain:
        axes = const_of(prod.inputs[1]) if len(prod.inputs) > 1 else np.array(prod.attrs.get("axes", []))
        if axes is not None and list(axes.reshape(-1)) in ([-1], [len(ids.shape) - 1]):
            return prod.inputs[0]
    return None


def selection_candidates(nodes) -> list[tuple[Node, Value]]:
    """(node, expert indices) for each TopK, each constant-table lookup and each Concat of two ArgMaxes
    (SparseMixer), in graph order."""
    out = []
    for node in nodes:
        if node.op_type == "TopK" and not node.domain:
            out.append((node, node.outputs[1]))
        elif table_lookup(node) is not None or _argmax_pair(node) is not None:
            out.append((node, node.outputs[0]))
    return out


def _argmax_pair(node: Node) -> Optional[tuple[Node, Node]]:
    """The two keepdims ArgMax nodes over the last axis a Concat joins along the last axis, else None."""
    if node.op_type != "Concat" or node.domain or len(node.inputs) != 2:
        return None
    prods = [v.producer for v in node.inputs]
    ok = all(p is not None and p.op_type == "ArgMax" and not p.domain and p.attrs.get("keepdims", 1) == 1
             and not p.attrs.get("select_last_index", 0) and axis_is_last(p, _rank(p.inputs[0]), 0) for p in prods)
    return tuple(prods) if ok and axis_is_last(node, _rank(node.outputs[0]), 0) else None


# ---- the analysis ----------------------------------------------------------------------------

def analyze_router(selection: Node, idx: Value) -> Router:
    """Read the router whose expert choice is `idx` (output of `selection`). Raises NoMatch."""
    if idx.shape is None or not idx.shape or not isinstance(idx.shape[-1], int):
        raise NoMatch(f"%{idx.name}: the number of selected experts is not static")
    top_k = int(idx.shape[-1])
    if _argmax_pair(selection) is not None:
        return _sparsemixer(selection, idx)

    # Routing weights: the scores of the chosen experts (GatherElements), or the TopK's own values.
    gathers = tuple(u for u, i in idx.uses if u.op_type == "GatherElements" and i == 1 and not u.domain)
    if gathers:
        scores = gathers[0].inputs[0]
        if any(g.inputs[0] is not scores or not axis_is_last(g, _rank(scores), 0) for g in gathers):
            raise NoMatch(f"%{idx.name}: the routing weights are gathered from different tensors or axes")
        w0 = gathers[0].outputs[0]
    elif selection.op_type == "TopK":
        scores, w0 = selection.inputs[0], selection.outputs[0]
    else:
        raise NoMatch(f"%{idx.name}: no routing weights are gathered with the selected experts")

    logits, x, router_w, router_w_value, router_b = _find_logits(scores)
    num_experts = router_w.shape[1]
    if logits is scores:            # top-k of the raw logits, scored afterwards (scoring is monotone)
        scoring, renormalize, w0 = _scoring_after_topk(w0)
    else:
        scoring = identify_scoring(logits, scores)
        renormalize = 0
    weights, renorm, scale = _weight_chain(w0)
    router = Router(x=x, logits=logits, router_w=router_w, router_w_value=router_w_value, scores=scores,
                    scoring=scoring, indices=idx, weights=weights, top_k=top_k,
                    renormalize=max(renormalize, renorm), routed_scaling=scale, weight_gathers=gathers,
                    router_b=router_b)

    if selection.op_type == "TopK":
        _read_topk_selection(selection, router, num_experts)
    else:
        table = selection.inputs[0]
        if table.const.shape[1] != top_k:
            raise NoMatch(f"hash table %{table.name} {table.const.shape} does not hold {top_k} experts per token")
        if table.const.min() < 0 or table.const.max() >= num_experts:
            raise NoMatch(f"hash table %{table.name} names experts outside 0..{num_experts - 1}")
        router.hash_table, router.token_ids = table, table_lookup(selection)
    return router


def _sparsemixer(concat: Node, idx: Value) -> Router:
    """PhiMoE's SparseMixer: idx = [argmax(z), argmax(scatter(z, first, -inf))], the weights the Concat of each
    pick's probability in its masked softmax (GatherElements by that pick). jitter_eps is read off the
    threshold the masks compare with (2 * jitter_eps); the block's check proves the rest."""
    first, second = _argmax_pair(concat)
    logits = first.inputs[0]
    scatter = second.inputs[0].producer
    if scatter is None or scatter.op_type != "ScatterElements" or scatter.inputs[0] is not logits \
            or scatter.inputs[1] is not first.outputs[0]:
        raise NoMatch(f"{concat.name}: the second ArgMax is not over the logits with the first choice removed")
    gathers = []
    for pick in (first, second):
        g = [u for u, i in pick.outputs[0].uses if u.op_type == "GatherElements" and i == 1 and not u.domain]
        if len(g) != 1:
            raise NoMatch(f"{pick.name}: no one routing weight is gathered at this pick")
        gathers.append(g[0])
    joins = {id(u): u for u, _ in gathers[0].outputs[0].uses if u.op_type == "Concat" and not u.domain
             and [v.producer for v in u.inputs] == gathers}
    if len(joins) != 1:
        raise NoMatch(f"{concat.name}: the two picks' weights are not concatenated in pick order")
    thresholds = {scalar_of(u.inputs[1]) for u in _downstream(logits, "Greater") if const_of(u.inputs[1]) is not None}
    if len(thresholds) != 1 or None in thresholds:
        raise NoMatch(f"{concat.name}: the masks do not compare with one constant threshold (2 * jitter_eps)")
    x_logits, x, router_w, router_w_value, router_b = _find_logits(logits)
    weights, renorm, scale = _weight_chain(next(iter(joins.values())).outputs[0])
    if renorm:
        raise NoMatch(f"{concat.name}: SparseMixer weights renormalised afterwards")
    return Router(x=x, logits=x_logits, router_w=router_w, router_w_value=router_w_value, scores=logits,
                  scoring="softmax", indices=idx, weights=weights, top_k=2, routed_scaling=scale,
                  router_b=router_b, routing="sparsemixer", jitter_eps=thresholds.pop() / 2)


def _downstream(v: Value, op: str, depth: int = 4) -> list[Node]:
    """The `op` nodes within `depth` elementwise steps downstream of v."""
    found, frontier = [], [v]
    for _ in range(depth):
        nxt = []
        for value in frontier:
            for u in value.users:
                if u.op_type == op and not u.domain:
                    found.append(u)
                elif not u.domain and u.op_type in ("Abs", "Max", "Sub", "Div"):
                    nxt.append(u.outputs[0])
        frontier = nxt
    return found


def _find_logits(scores: Value) -> tuple[Value, Value, np.ndarray, Optional[Value], Optional[Value]]:
    """Walk back from the scores to the router projection. Returns (logits, x, W [H, E], W's value, bias)."""
    seen: set[int] = set()
    stack, found = [scores], []
    while stack:
        v = stack.pop()
        if id(v) in seen or v.const is not None:
            continue
        seen.add(id(v))
        node = v.producer
        if node is None:
            raise NoMatch(f"%{scores.name}: the scores depend on graph input %{v.name}, not on a router projection")
        proj = _router_projection(node)
        if proj is not None:
            found.append((v, proj))
            continue
        if len(seen) > _MAX_SCORING_NODES:
            raise NoMatch(f"%{scores.name}: no router projection (x @ W with a constant W) within "
                         f"{_MAX_SCORING_NODES} ops of the scores")
        stack.extend(i for i in node.inputs if i is not None)
    if len({id(v) for v, _ in found}) != 1:
        raise NoMatch(f"%{scores.name}: the scores are not a function of one router projection")
    logits, (x, w, w_value, bias) = found[0]
    if x.shape is None or w.shape[0] != x.shape[-1]:
        raise NoMatch(f"%{logits.name}: router weight {w.shape} does not match the hidden size of %{x.name}")
    return logits, x, w, w_value, bias


def _router_projection(node: Node) -> Optional[tuple[Value, np.ndarray, Optional[Value], Optional[Value]]]:
    """(x, W as [H, E], the constant holding W as is, a bias [E] or None) if `node` is x @ W (+ b) with a
    constant 2-D W (and constant b)."""
    if node.domain or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    a, b = node.inputs[0], node.inputs[1]
    w = const_of(b)
    if w is None or w.ndim != 2 or a.const is not None or not is_float(w):
        return None
    if node.op_type == "MatMul":
        return a, w, b, None
    if node.attrs.get("transA", 0):
        return None
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = None
    if c is not None and (const_of(c) is None or const_of(c).size != w.shape[0 if node.attrs.get("transB", 0) else 1]
                          or node.attrs.get("beta", 1.0) != 1.0):
        return None                                   # not one constant bias per expert
    if c is not None and np.any(const_of(c) != 0):
        bias = c
    alpha = float(node.attrs.get("alpha", 1.0))
    w = w.T if node.attrs.get("transB", 0) else w
    if alpha != 1.0:
        w = w * np.asarray(alpha, w.dtype)
    same = b if not node.attrs.get("transB", 0) and alpha == 1.0 else None
    return a, np.ascontiguousarray(w), same, bias


def identify_scoring(logits: Value, scores: Value) -> str:
    """Which of polyport::MoE's scoring functions the region logits -> scores computes."""
    from ..runtime.reference import ReferenceSession
    from .region import region_graph

    num_experts = logits.shape[-1]
    if scores.shape != logits.shape or not isinstance(num_experts, int):
        raise NoMatch(f"%{scores.name}: the scores do not have the logits' shape")
    try:
        region = region_graph([logits], scores)
    except (ValueError, AssertionError) as e:
        raise NoMatch(f"%{scores.name}: the scores are not a function of the logits alone ({e})") from None
    symbols = {s: 3 for s in logits.type.symbols}
    shape = tuple(d if isinstance(d, int) else d.evaluate(symbols) for d in logits.shape)
    rng = np.random.default_rng(0)
    z = (rng.standard_normal(shape) * 4).astype(logits.dtype.numpy)
    z.reshape(-1)[:2] = (25.0, -25.0)          # past torch's softplus threshold (20) on both sides
    try:
        got = ReferenceSession(region).run({region.inputs[0].name: z}, symbols)[region.outputs[0].name]
    except Exception as e:  # noqa: BLE001 - a region that cannot run is no scoring function
        raise NoMatch(f"%{scores.name}: cannot evaluate the scoring ({type(e).__name__}: {e})") from None
    zf, rtol = z.astype(np.float64), tolerance(logits.dtype)
    for name, fn in SCORING.items():
        want = fn(zf)
        if np.allclose(got.astype(np.float64), want, rtol=rtol, atol=rtol * 1e-2 * float(np.abs(want).max())):
            return name
    ops = sorted({n.op_type for n in region.nodes})
    raise NoMatch(f"%{scores.name}: the scoring ({', '.join(ops)}) is not softmax, sigmoid or sqrt(softplus)")


def _scoring_after_topk(values: Value) -> tuple[str, int, Value]:
    """Top-k of the raw logits, then a softmax over the chosen ones (= softmax scoring, renormalised)
    or a sigmoid of each (= sigmoid scoring). Returns (scoring, renormalize, weights)."""
    user = _only_user(values)
    if user is not None and user.op_type == "Softmax" and not user.domain and axis_is_last(user, _rank(values)):
        return "softmax", 1, user.outputs[0]
    if user is not None and user.op_type == "Sigmoid" and not user.domain:
        return "sigmoid", 0, user.outputs[0]
    raise NoMatch(f"%{values.name}: top-k of the raw logits, but the chosen logits are not scored by a softmax "
                 "or a sigmoid")


def _is_sum_of(v: Value, w: Value) -> bool:
    """v == ReduceSum(w, last axis, keepdims), guarded by a tiny epsilon: sum + eps, or
    max(sum, eps) (Clip(min=eps) or Max; Ernie 4.5's `clamp(min=norm_min)`)."""
    node = v.producer
    if node is not None and node.op_type in ("Add", "Max") and not node.domain and len(node.inputs) == 2:
        a, b = node.inputs
        eps = scalar_of(b) if const_of(b) is not None else scalar_of(a)
        inner = a if const_of(b) is not None else b
        if eps is None or abs(eps) > 1e-6:
            return False
        node = inner.producer
    elif node is not None and node.op_type == "Clip" and not node.domain:
        lo = scalar_of(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        hi = node.inputs[2] if len(node.inputs) > 2 else None
        if lo is None or abs(lo) > 1e-6 or hi is not None:
            return False
        node = node.inputs[0].producer
    return (node is not None and node.op_type == "ReduceSum" and not node.domain and node.inputs[0] is w
            and node.attrs.get("keepdims", 1) == 1 and reduces_last_axis(node, _rank(w)))


def _weight_chain(w: Value) -> tuple[Value, int, float]:
    """From the chosen scores forward: (the weights the combine reads, renormalize, routed_scaling)."""
    renormalize, scale = 0, 1.0
    while not w.is_graph_output:
        divs = [u for u in w.users if u.op_type == "Div" and u.inputs[0] is w and _is_sum_of(u.inputs[1], w)]
        if divs:
            w, renormalize, scale = divs[0].outputs[0], 1, 1.0   # a scale before the division cancels
            continue
        user = _only_user(w)
        if user is None or user.op_type not in ("Mul", "Div") or user.domain:
            break
        other = user.inputs[1] if user.inputs[0] is w else user.inputs[0]
        c = scalar_of(other)
        if c is None or (user.op_type == "Div" and user.inputs[0] is not w):
            break
        scale = scale * c if user.op_type == "Mul" else scale / c
        w = user.outputs[0]
    return w, renormalize, scale


def _read_topk_selection(topk: Node, router: Router, num_experts: int) -> None:
    """Bias, group limits and k of a top-k selection; fills `router` in place."""
    if not topk.attrs.get("largest", 1):
        raise NoMatch(f"{topk.name}: selects the smallest scores")
    choice = topk.inputs[0]
    if not axis_is_last(topk, _rank(choice)):
        raise NoMatch(f"{topk.name}: selects along axis {topk.attrs.get('axis')}, not over the experts")
    k = const_of(topk.inputs[1])
    if k is None or int(k.reshape(-1)[0]) != router.top_k:
        raise NoMatch(f"{topk.name}: k is not the constant {router.top_k}")
    if choice is router.scores or choice is router.logits:
        return
    # Group-limited routing: Where(group_mask, choice, -inf) (or the mask negated and the operands swapped).
    where = choice.producer
    masked = None
    if where is not None and where.op_type == "Where" and not where.domain:
        for fill_slot, keep_slot in ((1, 2), (2, 1)):
            fill = scalar_of(where.inputs[fill_slot])
            if fill is not None and const_of(where.inputs[keep_slot]) is None:
                if fill > _MASK_FILL_MAX:
                    raise NoMatch(f"{where.name}: unselected groups are filled with {fill}, not -inf; "
                                 "polyport::MoE excludes them outright")
                masked, choice = where, where.inputs[keep_slot]
                break
    if choice is not router.scores:
        add = choice.producer
        bias = None
        if add is not None and add.op_type == "Add" and not add.domain:
            for s, b in (add.inputs, add.inputs[::-1]):
                arr = const_of(b)
                if s is router.scores and arr is not None and arr.shape[-1:] == (num_experts,) \
                        and arr.size == num_experts:
                    bias = b
        if bias is None:
            raise NoMatch(f"{topk.name}: selects on %{choice.name}, which is neither the scores nor scores + a "
                         "constant per-expert bias")
        router.e_bias = bias
    if masked is not None:
        router.n_group, router.topk_group = _group_limits(choice, num_experts)


def _group_limits(choice: Value, num_experts: int) -> tuple[int, int]:
    """(n_group, topk_group) of a group-limited selection over `choice` (scores + bias)."""
    for user in choice.users:
        out = user.outputs[0]
        if user.op_type != "Reshape" or out.shape is None or len(out.shape) < 2:
            continue
        groups, per = out.shape[-2], out.shape[-1]
        if not (isinstance(groups, int) and isinstance(per, int) and groups * per == num_experts):
            continue
        group_score = _group_score(out)
        ranks = [u for u in group_score.users if u.op_type == "TopK" and not u.domain]
        if len(ranks) != 1 or not ranks[0].attrs.get("largest", 1) or const_of(ranks[0].inputs[1]) is None:
            raise NoMatch(f"%{group_score.name}: the groups are not ranked by one top-k")
        return groups, int(const_of(ranks[0].inputs[1]).reshape(-1)[0])
    raise NoMatch(f"%{choice.name}: masked selection, but no reshape of the choice into [groups, experts/group]")


def _group_score(grouped: Value) -> Value:
    """The per-group score: the sum of each group's best two choices (the only rule polyport::MoE has)."""
    for user in grouped.users:
        if user.op_type in ("ReduceMax", "ArgMax"):
            raise NoMatch(f"{user.name}: groups are ranked by their best expert (DeepSeek-V2 style); "
                         "polyport::MoE ranks them by the sum of their best two")
        if user.op_type == "TopK" and const_of(user.inputs[1]) is not None \
                and int(const_of(user.inputs[1]).reshape(-1)[0]) == 2:
            total = _only_user(user.outputs[0])
            if total is not None and total.op_type == "ReduceSum" and reduces_last_axis(total, _rank(grouped)):
                return total.outputs[0]
    raise NoMatch(f"%{grouped.name}: the group score is not the sum of the best two experts per group")

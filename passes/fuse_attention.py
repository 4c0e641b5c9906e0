"""fuse-attention: softmax(q @ k^T * scale + mask) @ v  ->  polyport::Attention.

The rule anchors on meaning, not on one exporter's chain: a Softmax over the
last axis of scores that one MatMul q @ k^T produced, whose result (NaN-guarded
or with a sink column sliced off, maybe) is the left operand of a MatMul with v.
Between q @ k^T and the Softmax it accepts, in any order:

  scale   Mul / Div by a scalar constant; also on q's or k's side (sdpa puts sqrt(scale) on both)
  mask    Add of a float mask; Where(keep, scores, -inf) or Where(block, -inf, scores)
  sinks   Concat([scores, per-head sink], last axis) before the Softmax, Slice dropping it after
  shift   Sub(scores, ReduceMax(scores)): softmax does not see it
  softcap c * Tanh(scores * s / c) (Gemma 2), inside every mask and sink: `softcap` = c

Masks computed from positions alone become `causal` / `window`, proved by
running them (attention_mask.py); a data-dependent mask stays an operand.
q, k and v are searched upstream of the MatMuls through layout ops (Transpose,
Reshape, Expand, Unsqueeze, Squeeze) and scalar scales: every point that a
transpose puts into [batch, heads, seq, head_dim] is a candidate, K/V with the
fewest heads first (before repeat_kv), then those needing no transpose (one is
inserted otherwise). Each candidate is confirmed with `region.equivalent`
before the rewrite; a near miss leaves the graph unchanged and says why.
Attention nodes that arrive fused (ONNX Attention, opset 23) get the same
treatment: K/V before the exporter's repeat_kv, position masks proved causal.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from ..ir.dtypes import BOOL
from ..ir.ops import POLYPORT_DOMAIN, attrs_of, known_value
from ..ir.types import TensorType
from ._match_util import ints, is_last_axis, scalar
from .attention_mask import BLOCKED, MaskPart, analyse, position_only
from .manager import PassResult, register_pass
from .pattern import NoMatch
from .region import equivalent, region_graph, replace_with_fused

LAYOUT_OPS = ("Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze")
SCORE_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Concat", "Cast", "Tanh", "MatMul")
MAX_TRIES = 6   # equivalence checks per softmax
IDENTITY = (0, 1, 2, 3)
PERMS = sorted(itertools.permutations(range(4)), key=lambda p: sum(a > b for a, b in itertools.combinations(p, 2)))


@dataclasses.dataclass
class Scores:
    """What lies between q @ k^T and the softmax."""
    qk: Node
    scale: float = 1.0
    masks: list[MaskPart] = dataclasses.field(default_factory=list)
    sinks: Optional[Value] = None
    sink_scale: float = 1.0
    softcap: float = 0.0


@dataclasses.dataclass(frozen=True)
class Operand:
    """One Attention input: `raw` itself, or `op(raw)` inserted in front of the fused node."""
    raw: Value
    op: str = ""          # "", "Transpose" or "Not"
    arg: tuple = ()       # the Transpose perm
    scale: float = 1.0    # scalar factor between raw and the MatMul (q and k)

    @property
    def type(self) -> TensorType:
        t = self.raw.type
        return TensorType(t.dtype, tuple(t.shape[i] for i in self.arg)) if self.op == "Transpose" else t

    heads = property(lambda self: self.type.shape[1])


# ---- the pattern: from the Softmax out to the MatMul with v, and back to q @ k^T ------------------------

def _output_matmul(sm: Node) -> tuple[Node, bool]:
    """(the MatMul computing softmax(...) @ v, whether a sink column is sliced off); raises NoMatch."""
    p, sliced = sm.outputs[0], False
    for _ in range(4):
        users = p.users
        if p.is_graph_output:
            raise NoMatch(f"softmax output %{p.name} is a graph output")
        guard = _nan_guard(p, users)
        if guard is not None:
            p = guard
            continue
        if len(users) == 1 and users[0].op_type == "Slice" and not sliced and _drops_last(users[0], p):
            p, sliced = users[0].outputs[0], True
            continue
        if len(users) == 1 and users[0].op_type == "Cast" and _float_cast(users[0]):
            p = users[0].outputs[0]
            continue
        if len(users) == 1 and users[0].op_type == "MatMul" and users[0].inputs[0] is p \
                and users[0].inputs[1] is not p:
            return users[0], sliced
        break
    names = ", ".join(f"{u.op_type} ({u.name})" for u in users) or "nothing"
    raise NoMatch(f"softmax output %{p.name} is used by {names}, not only multiplied by v")


def _nan_guard(p: Value, users: list[Node]) -> Optional[Value]:
    """`Where(IsNaN(p), 0, p)` (sdpa's guard for fully masked rows) -> its output."""
    isnan = [u for u in users if u.op_type == "IsNaN"]
    where = isnan[0].outputs[0].users if len(users) == 2 and len(isnan) == 1 else []
    ok = len(where) == 1 and where[0].op_type == "Where" and where[0] in users and where[0].inputs[2] is p \
        and scalar(where[0].inputs[1]) == 0
    return where[0].outputs[0] if ok else None


def _drops_last(node: Node, p: Value) -> bool:
    """Slice(p) over the last axis starting at 0 (the sink column's removal; equivalence checks the end)."""
    axes = ints(node.inputs[3]) if len(node.inputs) > 3 else None
    return node.inputs[0] is p and ints(node.inputs[1]) == [0] and axes is not None and len(axes) == 1 \
        and is_last_axis(axes[0], p)


def _scores(x: Value, sliced: bool) -> Scores:
    """Walk from the softmax input back to q @ k^T, collecting scale, masks and sinks; raises NoMatch."""
    found = Scores(qk=None)
    outer = 1.0                       # scale factors met so far (applied after what comes next)
    for _ in range(32):
        node = x.producer
        if node is None or node.domain:
            raise NoMatch(f"scores %{x.name} are not computed by q @ k^T")
        op, ins = node.op_type, node.inputs
        if op == "MatMul":
            found.qk = node
            return found
        if found.softcap and op not in ("Mul", "Div", "Cast"):
            raise NoMatch(f"{op} ({node.name}) inside the soft-cap's tanh: only a scale may sit there")
        if op == "Tanh":
            if found.scale <= 0:
                raise NoMatch(f"Tanh ({node.name}) is scaled by {found.scale:g} after it: not a soft-cap")
            found.softcap, x = found.scale, ins[0]     # c * tanh(s / c): scale keeps c, the inner 1/c cancels it
        elif op == "Sub" and ins[1].producer is not None and ins[1].producer.op_type == "ReduceMax" \
                and ins[1].producer.inputs[0] is ins[0]:
            x = ins[0]
        elif op == "Concat" and sliced and found.sinks is None and len(ins) == 2 \
                and is_last_axis(node.attrs.get("axis"), x):
            found.sinks, found.sink_scale, x = ins[1], outer, ins[0]
        elif op in ("Mul", "Div") and _scaled(node) is not None:
            x, c = _scaled(node)
            found.scale, outer = found.scale * c, outer * c
        elif op == "Add" and _score_path(ins) is not None:
            i = _score_path(ins)
            found.masks.append(MaskPart("add", ins[1 - i], outer))
            x = ins[i]
        elif op == "Where" and _is_fill(ins[2]):
            found.masks.append(MaskPart("keep", ins[0], outer))
            x = ins[1]
        elif op == "Where" and _is_fill(ins[1]):
            found.masks.append(MaskPart("block", ins[0], outer))
            x = ins[2]
        elif op == "Cast" and _float_cast(node):
            x = ins[0]
        else:
            raise NoMatch(f"scores pass through {op} ({node.name}), which is not a scale, mask or sink")
    raise NoMatch("scores chain too long")


def _float_cast(node: Node) -> bool:
    a, b = node.inputs[0].dtype, node.outputs[0].dtype
    return a is not None and b is not None and a.is_float and b.is_float


def _scaled(node: Node) -> Optional[tuple[Value, float]]:
    """`x * c`, `c * x` or `x / c` with c a scalar constant -> (x, factor)."""
    a, b = node.inputs[:2]
    if node.op_type == "Div":
        c = scalar(b)
        return (a, 1.0 / c) if c and a.const is None else None
    for x, c in ((a, scalar(b)), (b, scalar(a))):
        if c is not None and x.const is None:
            return x, c
    return None


def _is_fill(v: Value) -> bool:
    arr = known_value(v)
    return arr is not None and arr.dtype != object and arr.dtype.kind == "f" and arr.size > 0 \
        and bool(np.all(arr <= BLOCKED))


def _score_path(ins) -> Optional[int]:
    """Which operand of an Add carries the scores: the one reaching a MatMul through score ops, else the
    only one as large as the sum (the walk then stops there with a reason)."""
    hits = [i for i, v in enumerate(ins[:2]) if _reaches_matmul(v)] or \
        [i for i, (a, b) in enumerate((ins[:2], ins[1::-1])) if a.shape and b.shape and len(a.shape) >= len(b.shape)
         and all(y == 1 or x == y for x, y in zip(a.shape[::-1], b.shape[::-1]))]
    return hits[0] if len(hits) == 1 else None


def _reaches_matmul(v: Value, budget: int = 24) -> bool:
    stack, seen = [v], set()
    while stack and budget > 0:
        x = stack.pop()
        node = x.producer if x is not None else None
        if node is None or id(node) in seen or node.domain or node.op_type not in SCORE_OPS:
            continue
        if node.op_type == "MatMul":
            return True
        seen.add(id(node))
        budget -= 1
        stack.extend(node.inputs)
    return False


# ---- candidates for q, k, v ---------------------------------------------------------------------

def _upstream(v: Value, scales: bool) -> list[tuple[Value, float]]:
    """v and the values it is a layout change (or a scalar multiple) of, nearest first."""
    out, scale = [], 1.0
    while True:
        out.append((v, scale))
        node = v.producer
        if node is None or node.domain or not node.inputs:
            return out
        if node.op_type in LAYOUT_OPS:
            v = node.inputs[0]
        elif scales and node.op_type in ("Mul", "Div") and _scaled(node) is not None:
            v, c = _scaled(node)
            scale *= c
        else:
            return out


def _layouts(v: Value, want: tuple, heads: int, scales: bool = True) -> list[Operand]:
    """Points upstream of `v` that a transpose puts into `want` = [batch, heads, seq, dim] (heads None: any
    divisor of `heads`), ordered fewest heads first, then no transpose, then farthest upstream."""
    found = []
    for depth, (x, scale) in enumerate(_upstream(v, scales)):
        if x.shape is None or len(x.shape) != 4:
            continue
        for perm in PERMS:
            s = tuple(x.shape[i] for i in perm)
            h = s[1]
            if not all(w is None or d == w for d, w in zip(s, want)) or not isinstance(h, int) \
                    or h <= 0 or heads % h:
                continue
            op = Operand(x, "Transpose", perm, scale) if perm != IDENTITY else Operand(x, scale=scale)
            found.append(((h, perm != IDENTITY, -depth), op))
            break
    return [op for _, op in sorted(found, key=lambda t: t[0])]


def _combos(qs: list[Operand], ks: list[Operand], vs: list[Operand]) -> Iterator[tuple[Operand, ...]]:
    for k, v in itertools.product(ks, vs):
        if k.heads != v.heads or (k.raw is v.raw and (k.op, k.arg) != (v.op, v.arg)):
            continue
        for q in qs:
            yield q, k, v


def _sinks(sc: Scores, heads: int) -> Optional[Operand]:
    """The sink column (an Expand of one constant logit per head) as a [heads] constant."""
    s = sc.sinks
    while s.producer is not None and s.producer.op_type == "Expand":
        s = s.producer.inputs[0]
    arr = known_value(s)
    if arr is None or arr.dtype == object or arr.size != heads:
        return None
    arr = (arr.reshape(heads) * np.asarray(sc.sink_scale, arr.dtype)).astype(arr.dtype)
    return Operand(Value("sinks", TensorType(s.dtype, (heads,)), const=arr))


# ---- confirm and rewrite ------------------------------------------------------------------------

def _materialise(graph: Graph, o: Operand, x: Value, before: Node) -> Value:
    """Insert `o.op(x)` into `graph` before `before`."""
    attrs = {"perm": list(o.arg)} if o.op == "Transpose" else {}
    return graph.make_node(o.op, [x], attrs=attrs, types=[o.type], name=f"{x.name}_{o.op.lower()}",
                           before=before).outputs[0]


def _inverse(o: Operand, y: Value) -> Operand:
    """The operand that turns `y = o.op(x)` back into x."""
    return Operand(y, o.op, tuple(int(i) for i in np.argsort(o.arg)))   # Transpose^-1; Not is its own


def _feed(graph: Graph, operands: list[Optional[Operand]], value_of, before: Node,
          rewire: bool = False) -> list[Optional[Value]]:
    """The values to hand to Attention in `graph`; derived operands are inserted before `before` (once each).
    With `rewire`, the region then reads inverse(op(x)) where it read x, so op(x) can be its input."""
    fed, made = [], {}
    for o in operands:
        x = value_of(o.raw) if o is not None else None
        if o is None or not o.op:
            fed.append(x)
            continue
        key = (id(o.raw), o.op, o.arg)
        if key not in made:
            made[key] = y = _materialise(graph, o, x, before)
            if rewire:
                back = _materialise(graph, _inverse(o, y), y, before)
                for node, i in x.uses:
                    if node is not y.producer:
                        node.set_input(i, back)
        fed.append(made[key])
    return fed


def _confirm(out: Value, operands: list[Optional[Operand]], attrs: dict) -> None:
    """`equivalent` on a scratch copy of the region, so that derived operands can be its inputs."""
    raws = list({id(o.raw): o.raw for o in operands if o is not None and o.raw.const is None}.values())
    try:
        g = region_graph(raws, out)
    except ValueError as e:
        raise NoMatch(str(e)) from None
    mapped = dict(zip(map(id, raws), g.inputs))
    fed = _feed(g, operands, lambda r: mapped.get(id(r), r), g.nodes[0], rewire=True)
    inputs = list({id(v): v for v in fed if v is not None and v.const is None}.values())
    equivalent(inputs, g.outputs[0], "Attention", fed, attrs)


def _rewrite(graph: Graph, out: Value, operands: list[Optional[Operand]], attrs: dict) -> None:
    def adopt(r: Value) -> Value:   # constants made by the rule (sinks) join the graph
        free = r.const is not None and r.producer is None and graph.constants.get(r.name) is not r
        return graph.add_constant(f"{out.producer.name}_{r.name}", r.const) if free else r
    fed = _feed(graph, operands, adopt, out.producer)
    while fed and fed[-1] is None:
        fed.pop()
    replace_with_fused(out, "Attention", fed, attrs)


# ---- the rule -----------------------------------------------------------------------------------

def _fuse_one(graph: Graph, sm: Node, masks: dict) -> None:
    """Fuse the attention around softmax `sm`; raises NoMatch."""
    x = sm.inputs[0]
    if x.shape is None or len(x.shape) != 4 or not is_last_axis(sm.attrs.get("axis", -1), x):
        raise NoMatch(f"softmax over axis {sm.attrs.get('axis', -1)} of {x.type}: not the last axis of rank-4 scores")
    pv, sliced = _output_matmul(sm)
    sc = _scores(x, sliced)
    if sliced and sc.sinks is None:
        raise NoMatch("softmax output is sliced but no sink column was concatenated")
    q_side, kt_side = sc.qk.inputs
    scores = sc.qk.outputs[0]
    if scores.shape is None or len(scores.shape) != 4 or not isinstance(scores.shape[1], int) \
            or kt_side.shape is None or pv.outputs[0].shape is None:
        raise NoMatch(f"q @ k^T is {scores.type}, not [batch, heads, seq, seq] with static heads")
    b, heads, s, skv = scores.shape
    dqk, dv = kt_side.shape[-2], pv.outputs[0].shape[-1]
    qs = _layouts(q_side, (b, heads, s, dqk), heads)
    ks = _layouts(kt_side, (b, None, skv, dqk), heads)
    vs = _layouts(pv.inputs[1], (b, None, skv, dv), heads, scales=False)
    if not qs:
        raise NoMatch(f"no [batch, {heads}, seq, dim] q upstream of %{q_side.name} ({q_side.type})")
    if not ks or not vs:
        raise NoMatch(f"no [batch, kv_heads, seq, dim] k/v upstream of %{kt_side.name} / %{pv.inputs[1].name}")
    if any(None in o.raw.shape for o in (qs[0], ks[0], vs[0])):
        unknown = next(o.raw for o in (qs[0], ks[0], vs[0]) if None in o.raw.shape)
        raise NoMatch(f"%{unknown.name} is {unknown.type}: a length that is not a polynomial in seq (e.g. "
                      f"compressed KV appended) cannot be fed to the equivalence check")
    meaning = analyse(sc.masks, scores, masks)
    sinks = _sinks(sc, heads) if sc.sinks is not None else None
    if sc.sinks is not None and sinks is None:
        raise NoMatch(f"sink column %{sc.sinks.name} is not one constant logit per head")
    part = meaning.operand
    mask = None if part is None else Operand(part.value, "Not" if part.kind == "block" else "")
    proposals = (([q, k, v, mask, sinks],
                  {"num_heads": int(heads), "kv_heads": int(k.heads), "scale": float(sc.scale * q.scale * k.scale),
                   "causal": meaning.causal, "window": meaning.window, "softcap": float(sc.softcap)})
                 for q, k, v in itertools.islice(_combos(qs, ks, vs), MAX_TRIES))
    try:
        _rewrite_first(graph, pv.outputs[0], proposals, "no candidate")
    except NoMatch as e:
        raise NoMatch(f"not equivalent to Attention: {e}") from None


def _rewrite_first(graph: Graph, out: Value, proposals, why: str = "") -> None:
    """Rewrite `out` with the first (operands, attrs) proposal `_confirm` proves; raises NoMatch with why
    the last one failed (`why` when there was none)."""
    for operands, attrs in proposals:
        try:
            _confirm(out, operands, attrs)
        except NoMatch as e:
            why = str(e)
            continue
        _rewrite(graph, out, operands, attrs)
        return
    raise NoMatch(why)


def _refine(graph: Graph, node: Node, masks: dict) -> bool:
    """An Attention that arrived fused (ONNX Attention at import, after an exporter's repeat_kv and with a
    mask computed from positions): take K/V before the repeat, and prove the mask causal / banded.
    False where there is nothing to refine; raises NoMatch for a refinement that does not hold."""
    q, k, v, mask, sinks = (list(node.inputs) + [None] * 2)[:5]
    a, why = attrs_of(node), ""
    if any(x.shape is None or len(x.shape) != 4 for x in (q, k, v)):
        return False
    causal, window, keep_mask = a["causal"], a["window"], mask is not None
    if mask is not None and not (causal or window) and position_only(mask):
        scores = Value("scores", TensorType(q.dtype, q.shape[:3] + k.shape[2:3]))
        try:
            proved = analyse([MaskPart("keep" if mask.dtype == BOOL else "add", mask)], scores, masks)
            causal, window, keep_mask = proved.causal, proved.window, False
        except NoMatch as e:
            why = f"mask %{mask.name}: {e}"
    ks = _layouts(k, (k.shape[0], None) + k.shape[2:], a["num_heads"], False) + [Operand(k)]
    vs = _layouts(v, (v.shape[0], None) + v.shape[2:], a["num_heads"], False) + [Operand(v)]

    def proposals():
        for _, k2, v2 in itertools.islice(_combos([Operand(q)], ks, vs), MAX_TRIES):
            if k2.heads >= a["kv_heads"] and keep_mask == (mask is not None):
                return                                    # nothing to gain
            yield ([Operand(q), k2, v2, Operand(mask) if keep_mask else None, sinks and Operand(sinks)],
                   dict(a, kv_heads=int(k2.heads), causal=causal, window=window))
    try:
        _rewrite_first(graph, node.outputs[0], proposals(), why)
    except NoMatch as e:
        if str(e):
            raise NoMatch(f"imported Attention: {e}") from None
        return False
    return True


@register_pass("fuse-attention")
def fuse_attention(graph: Graph) -> PassResult:
    """softmax(q @ k^T * scale + mask) @ v -> polyport::Attention (GQA/MQA, causal, window, softcap, sinks)."""
    result, masks = PassResult(), {}
    for node in graph.nodes:
        if node.graph is not graph or node.op_type not in ("Softmax", "Attention"):
            continue
        try:
            if node.op_type == "Attention" and node.domain == POLYPORT_DOMAIN:
                if _refine(graph, node, masks):
                    result.count("Attention refined")
            elif node.op_type == "Softmax" and not node.domain:
                _fuse_one(graph, node, masks)
                result.count("Attention")
        except NoMatch as e:
            result.notes.append(f"{node.name}: {e}")
    if result.modified:
        graph.remove_unused()
    return result

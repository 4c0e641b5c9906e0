"""fuse-rotary: x*cos + rotate(x)*sin  ->  polyport::Rotary(x, cos, sin).

The rule has three spellings of one meaning (cos/sin stay computed upstream):
- half-split: rotate_half(x) = Concat(-x2, x1), x1/x2 the two halves of x
  (two Slices or one Split on the last axis);
- interleaved: rotate_every_two(x) = Reshape(Concat(Unsqueeze(-x[1::2]), Unsqueeze(x[0::2])))
  (DeepSeek-V4), Rotary(interleaved=1) with cos/sin repeated in place;
- rotated halves: Concat(x1*c - x2*s, x2*c + x1*s) (HF DeepSeek-V3 with
  rope_interleave: x1 = x[0::2], x2 = x[1::2], c/s the rotary_dim/2 frequencies).
  That is a half-split Rotary of the de-interleaved x; the rewrite makes the
  de-interleave explicit, Concat(x[0::2], x[1::2]), and cos/sin Concat(c, c).
Partial rotary: when x is x_all[..., :rd] and the result is concatenated back
with x_all[..., rd:], the whole becomes Rotary(x_all, rotary_dim=rd). A rotated
*suffix* (DeepSeek's nope-then-rope layout) stays a Slice + Rotary + Concat.
Meaning checks: the halves/pairs are the right slices of the same x, on the last
axis, the Concat/Unsqueeze axes are the last; then `equivalent` has the final word.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node, Value
from ._match_util import Part, ints, is_last_axis, last_dim, part_of, private, rank, sole_user
from .manager import PassResult, register_pass
from .pattern import AnyOf, NoMatch, Var, match, ops
from .region import equivalent, replace_with_fused

x, cos, sin = Var("x"), Var("cos"), Var("sin")
x1 = Var("x1", where=lambda v: part_of(v) is not None)
x2 = Var("x2", where=lambda v: part_of(v) is not None)


def _neg(p):
    return AnyOf((ops.Neg(p), ops.Mul(p, -1.0)))


HALF = ops.Concat(_neg(x2), x1, name="cat")
PAIRS = ops.Reshape(ops.Concat(ops.Unsqueeze(_neg(x2), name="u2"), ops.Unsqueeze(x1, name="u1"), name="cat"),
                    name="flat")
ROPE = ops.Add(ops.Mul(x, cos), ops.Mul(AnyOf((HALF, PAIRS), tag="layout"), sin))
HALVES = ops.Concat(ops.Sub(ops.Mul(x1, cos), ops.Mul(x2, sin)), ops.Add(ops.Mul(x2, cos), ops.Mul(x1, sin)),
                    name="cat")


def _made_of(v: Value, *ops_: str) -> bool:
    n = v.producer
    return n is not None and not n.domain and n.op_type in ops_


def _candidate(node: Node):
    """The pattern to try at `node`, when it looks like RoPE at all (else None: no note)."""
    ins = node.inputs
    if node.op_type == "Add" and len(ins) == 2 and all(_made_of(v, "Mul") for v in ins):
        if any(_made_of(v, "Concat") or _made_of(v, "Reshape") and _made_of(v.producer.inputs[0], "Concat")
               for m in ins for v in m.producer.inputs):
            return ROPE
    if node.op_type == "Concat" and len(ins) == 2 and _made_of(ins[0], "Sub") and _made_of(ins[1], "Add"):
        return HALVES
    return None


def _halves(m, xv: Value, interleaved: bool, stacked: bool) -> None:
    """Raises NoMatch unless x1/x2 are the halves (or the even/odd features) of x."""
    p1, p2, d = part_of(m["x1"]), part_of(m["x2"]), last_dim(xv)
    if d is None or d % 2 or p1.source is not xv or p2.source is not xv:
        raise NoMatch(f"the rotated parts are not two halves of %{xv.name} (last axis {d})")
    want = (range(0, d, 2), range(1, d, 2)) if interleaved else (range(0, d // 2), range(d // 2, d))
    if (p1.indices, p2.indices) != want:
        r1, r2 = p1.indices, p2.indices
        raise NoMatch(f"rotate uses x1=x[{r1.start}:{r1.stop}:{r1.step}], x2=x[{r2.start}:{r2.stop}:{r2.step}]: "
                      f"not (-x2, x1) of the {'even/odd features' if interleaved else 'halves'} (swapped?)")
    cat = m.node_of["cat"]
    if not is_last_axis(cat.attrs.get("axis"), cat.outputs[0]):
        raise NoMatch(f"Concat on axis {cat.attrs.get('axis')}, not the last")
    if stacked:
        for u in (m.node_of["u1"], m.node_of["u2"]):
            axes = u.attrs.get("axes") or ints(u.inputs[1] if len(u.inputs) > 1 else None)
            if axes not in ([-1], [rank(m["x1"])]):
                raise NoMatch(f"{u.name} unsqueezes axes {axes}, not a new last axis")
        if m.node_of["flat"].outputs[0].shape != xv.shape:
            raise NoMatch("the stacked pairs are not reshaped back to x's shape")


def _partial(xv: Value, out: Value):
    """Concat(rope(x_all[..., :rd]), x_all[..., rd:]) -> (x_all, rd, that Concat node), else None."""
    p, cat = part_of(xv), sole_user(out)
    if p is None or p.indices.start != 0 or p.indices.step != 1 or cat is None or cat.op_type != "Concat":
        return None
    d = last_dim(p.source)
    if len(cat.inputs) != 2 or cat.inputs[0] is not out or not is_last_axis(cat.attrs.get("axis"), out) \
            or part_of(cat.inputs[1]) != Part(p.source, range(p.indices.stop, d)):
        return None
    return p.source, p.indices.stop, cat


def _read(m, pattern) -> tuple[list[Value], list, dict]:
    """(region inputs, Rotary operands, attributes) for a match of ROPE or HALVES; raises NoMatch.
    An operand may be a pair (a, b): the rewrite's Concat(a, b) on the last axis."""
    if pattern is ROPE:
        xv, c, s = m["x"], m["cos"], m["sin"]
        if part_of(m["x1"]).source is c:              # Mul(cos, x) bound the other way round
            xv, c = c, xv
        layout = m.tags["layout"]
        _halves(m, xv, bool(layout), stacked=bool(layout))
        return [xv, c, s], [xv, c, s], {"interleaved": layout}
    xv, c, s = part_of(m["x1"]).source, m["cos"], m["sin"]
    deinterleave = part_of(m["x1"]).indices.step == 2
    _halves(m, xv, deinterleave, stacked=False)
    if not all(v.shape and isinstance(v.shape[-1], int) for v in (c, s)):
        raise NoMatch("cos/sin have no static last axis")
    x_in = (m["x1"], m["x2"]) if deinterleave else xv   # x[0::2], x[1::2]: Rotary reads their Concat
    return [xv, c, s], [x_in, (c, c), (s, s)], {"interleaved": 0}


@register_pass("fuse-rotary")
def fuse_rotary(graph: Graph) -> PassResult:
    """x*cos + rotate(x)*sin  ->  polyport::Rotary (half-split, interleaved, partial)."""
    result = PassResult()
    concats: dict[tuple[int, int], Value] = {}       # Concat(c, c) is shared by q, k and the layers

    def operand(v, anchor: Node) -> Value:
        if isinstance(v, Value):
            return v
        a, b = v
        if (id(a), id(b)) not in concats:
            t = a.type.with_shape(a.shape[:-1] + (a.shape[-1] + b.shape[-1],))
            concats[id(a), id(b)] = graph.make_node("Concat", [a, b], attrs={"axis": -1}, types=[t],
                                                    name="rope_concat", before=anchor).outputs[0]
        return concats[id(a), id(b)]

    for node in graph.nodes:
        live = node.outputs[0].uses or node.outputs[0].is_graph_output
        pattern = _candidate(node) if node.graph is graph and live else None
        if pattern is None:
            continue
        try:
            try:
                m = match(pattern, node.outputs[0])
            except NoMatch as e:
                raise NoMatch(f"looks like RoPE, but {e}") from None
            inputs, operands, attrs = _read(m, pattern)
            if not private(m.nodes, node):
                raise NoMatch("an intermediate value of the rotation is used outside it")
            operands = [operand(v, node) for v in operands]
            out, halves = node.outputs[0], [m["x1"].producer, m["x2"].producer]
            partial = _partial(operands[0], out) if operands[0] is inputs[0] else None
            if partial is not None and private(m.nodes + halves + [inputs[0].producer, partial[2]], partial[2]):
                inputs[0], attrs["rotary_dim"], cat = partial
                out, operands[0] = cat.outputs[0], inputs[0]
            try:
                equivalent(inputs, out, "Rotary", operands, attrs)
            except NoMatch as e:
                raise NoMatch(f"not equivalent to Rotary{attrs}: {e}") from None
        except NoMatch as e:
            result.notes.append(f"{node.name}: {e}")
            continue
        replace_with_fused(out, "Rotary", operands, attrs)
        result.count("Rotary")
    graph.remove_unused()
    return result

"""fuse-rmsnorm: x * rsqrt(mean(x^2, last axis) + eps) [* w]  ->  polyport::RMSNorm(x, w).

The rule
- pattern: the normalised value `x * rsqrt(mean(x^2) + eps)`, spelled
  Pow(x, 2) or Mul(x, x); Reciprocal(Sqrt), Div(1, Sqrt), Pow(., -0.5) or x / Sqrt;
  found from its anchor, a ReduceMean over a square.
- below it, optionally: Cast, a Mul by a weight of shape [hidden] (either side),
  Cast; above it, optionally a Cast of x to fp32 (HF computes the norm in fp32).
- meaning: the mean is over the last axis only with keepdims, eps is a scalar
  constant, the region's interior is used by nothing else; then `equivalent`.
- rewrite: RMSNorm(x, w, epsilon=eps). Without a weight (DeepSeek-V4's mHC and
  per-head q norms) the weight is a constant of ones, so every RMSNorm has one.
  Gemma's `(1 + w)` needs nothing special: canonicalize folds it into a constant
  weight, and a non-constant weight of shape [hidden] is an ordinary operand.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir.graph import Graph, Node, Value
from ._match_util import const_like, ints, is_last_axis, last_dim, private, sole_user
from .manager import PassResult, register_pass
from .pattern import AnyOf, Const, NoMatch, Var, match, ops
from .region import equivalent, replace_with_fused

x = Var("x")
MEAN_SQUARE = ops.ReduceMean(AnyOf((ops.Pow(x, 2.0), ops.Mul(x, x))), name="mean")
VARIANCE = ops.Add(MEAN_SQUARE, Const("eps"))
RSQRT = AnyOf((ops.Reciprocal(ops.Sqrt(VARIANCE)), ops.Div(1.0, ops.Sqrt(VARIANCE)), ops.Pow(VARIANCE, -0.5)))
NORMALISED = AnyOf((ops.Mul(x, RSQRT), ops.Div(x, ops.Sqrt(VARIANCE))))


def _squares(node: Node) -> bool:
    """Anchor: a ReduceMean over Pow(a, 2) or Mul(a, a)."""
    src = node.inputs[0].producer if node.inputs and node.inputs[0] is not None else None
    return src is not None and not src.domain and (
        src.op_type == "Pow" or src.op_type == "Mul" and src.inputs[0] is src.inputs[1])


def _roots(mean: Node):
    """Mul/Div nodes up to four steps below the mean square: where x * rsqrt(...) may end."""
    frontier, seen = [mean], set()
    for _ in range(4):
        frontier = [u for n in frontier for o in n.outputs for u in o.users]
        for u in frontier:
            if u.op_type in ("Mul", "Div") and not u.domain and id(u) not in seen:
                seen.add(id(u))
                yield u


def _meaning(m) -> None:
    """Raises NoMatch unless the match is an RMSNorm over the last axis."""
    mean, xv, eps = m.node_of["mean"], m["x"], m.consts["eps"]
    axes = mean.attrs.get("axes")
    if axes is None and len(mean.inputs) > 1 and mean.inputs[1] is not None:
        axes = ints(mean.inputs[1])
    if axes is None or len(axes) != 1 or not is_last_axis(axes[0], xv):
        raise NoMatch(f"mean over axes {axes}, not the last axis only")
    if mean.attrs.get("keepdims", 1) != 1:
        raise NoMatch("mean with keepdims=0")
    if eps.size != 1:
        raise NoMatch(f"eps is not a scalar (shape {list(eps.shape)})")
    if xv.dtype is None or not xv.dtype.is_float or last_dim(xv) is None:
        raise NoMatch(f"x is {xv.type}: not a float tensor with a static last axis")


def _weight(mul: Node, out: Value, hidden: int) -> Optional[Value]:
    """The other operand of `mul` when it is a weight of shape [hidden] (a constant may carry leading 1s)."""
    w = mul.inputs[1] if mul.inputs[0] is out else mul.inputs[0]
    if w is None or w.shape is None:
        return None
    if tuple(w.shape) == (hidden,):
        return w
    if w.const is not None and w.const.size == hidden and w.shape[-1] == hidden:
        return const_like(mul.graph, f"{w.name}_1d", w.const.reshape(hidden))
    return None


def _extend(norm: Value, hidden: int):
    """Follow [Cast] [Mul by weight] [Cast] below the normalised value: (output, weight, nodes)."""
    out, weight, nodes = norm, None, []
    for op in ("Cast", "Mul", "Cast"):
        user = sole_user(out)
        if user is None or user.op_type != op or user.domain:
            continue
        if op == "Mul":
            weight = _weight(user, out, hidden)
            if weight is None:
                continue
        elif not user.outputs[0].dtype or not user.outputs[0].dtype.is_float:
            continue
        nodes.append(user)
        out = user.outputs[0]
    return out, weight, nodes


@register_pass("fuse-rmsnorm")
def fuse_rmsnorm(graph: Graph) -> PassResult:
    """x * rsqrt(mean(x^2) + eps) * w  ->  polyport::RMSNorm (weightless: w = ones)."""
    result = PassResult()
    ones: dict[tuple, Value] = {}
    for mean in graph.nodes:
        if mean.graph is not graph or mean.op_type != "ReduceMean" or mean.domain or not _squares(mean):
            continue
        try:
            _fuse(graph, mean, ones)
        except NoMatch as e:
            result.notes.append(f"{mean.name}: {e}")
            continue
        result.count("RMSNorm")
    graph.remove_unused()
    return result


def _fuse(graph: Graph, mean: Node, ones: dict[tuple, Value]) -> None:
    """Fuse the norm around `mean` (the ReduceMean of a square); raises NoMatch."""
    m, root, why = None, None, "no x * rsqrt(mean(x^2) + eps) below it"
    for root in _roots(mean):
        try:
            m = match(NORMALISED, root.outputs[0])
        except NoMatch as e:
            why = str(e) or why
            continue
        if m.node_of["mean"] is mean:
            break
        m = None
    if m is None:
        raise NoMatch(f"mean of a square, but {why}")
    _meaning(m)
    xv, hidden = m["x"], last_dim(m["x"])
    out, weight, nodes = _extend(root.outputs[0], hidden)
    x_in, cast = xv, xv.producer
    if cast is not None and cast.op_type == "Cast" and not cast.domain and cast.inputs[0].dtype == out.dtype \
            and private(m.nodes + [cast], root):
        x_in, nodes = cast.inputs[0], nodes + [cast]   # the norm computes in fp32 itself
    if x_in.dtype != out.dtype:
        raise NoMatch(f"output is {out.dtype}, input {x_in.dtype}; RMSNorm keeps the dtype")
    if not private(m.nodes + nodes, out.producer):
        raise NoMatch("an intermediate value of the norm is used outside it")
    if weight is None:
        key = (hidden, x_in.dtype.name)
        if key not in ones:
            ones[key] = const_like(graph, f"rms_ones_{hidden}", np.ones(hidden, x_in.dtype.numpy))
        weight = ones[key]
    attrs = {"epsilon": float(str(np.float32(m.consts["eps"].reshape(()))))}   # 1e-06, not 9.99e-07
    region_in = [x_in] + ([weight] if weight.const is None else [])
    try:
        equivalent(region_in, out, "RMSNorm", [x_in, weight], attrs)
    except NoMatch as e:
        raise NoMatch(f"not equivalent to RMSNorm: {e}") from None
    replace_with_fused(out, "RMSNorm", [x_in, weight], attrs)

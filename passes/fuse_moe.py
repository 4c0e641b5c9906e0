"""fuse-moe: a routed mixture-of-experts block -> one polyport::MoE.

Anchored on the router (moe_router.py reads it off the graph): from the selected
expert indices, follow

- the per-token gathers of constant expert weight tensors [E, ...] (GatherND or
  Gather by the indices) and the batched MatMuls they feed: a fused gate_up
  projection split in two (Split or Slices) or separate gate and up
  projections, the SwiGLU (the gate is the half that goes through the
  activation, optionally clamped, its sigmoid maybe scaled by alpha; the up half
  maybe offset: gpt-oss's (up + 1) * g * sigmoid(1.702 g)), and the down
  projection, which reads what the others computed; per-expert biases [E, out]
  gathered by the same indices and added to a projection's output (gpt-oss);
- from the down projection, the combine: the expert outputs weighted by the
  routing weights and summed per token (ReduceSum over k, a scatter-add, ...),
  up to the first value with the hidden states' shape that depends on the
  routing weights. That value is what polyport::MoE replaces; x is the router's
  input (the hidden states as the block receives them, e.g. [seq, H] after the
  exporter's flatten). A shared expert's add stays outside.

"Every expert computes the same function" is checked in code: the expert index
may select only the SwiGLU weight tensors, their biases and the routing weights,
and feed no other computation (a per-expert scale or activation switch would make
the experts differ in a way polyport::MoE cannot express). The router's values may
not be used outside the block (router logits feeding an auxiliary loss, say).
Expert weight tensors an export computes from low-bit codes (DeepSeek's FP8 128x128 blocks: a Cast of
the codes times expanded scales, passes/block_dequant.py) become quantized experts, the codes and block
scales in the MoE's layout (ir/fused/moe.py), when all three projections read them in one format.

Then the proposal is checked numerically against the region it replaces
(`equivalent`) before the rewrite. Every candidate that does not fuse leaves
the graph unchanged and says why in `PassResult.notes`; so does a TopK whose
indices select no expert weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import numpy as np

from ..ir import dtypes
from ..ir.graph import Graph, Node, Value
from ..ir.types import TensorType
from .manager import PassResult, register_pass
from ..ir.fused.moe import MOE_INPUTS
from ..ir.quant_layout import dq_format, pack_int4
from .block_dequant import block_codes, computed_from_codes
from .moe_router import (INDEX_SHAPE_OPS, Router, analyze_router, const_of, is_float, scalar_of,
                         selection_candidates)
from .pattern import NoMatch
from .region import equivalent, region_nodes, replace_with_fused

ACTIVATION_OPS = {"Sigmoid": "silu", "Erf": "gelu", "Tanh": "gelu_tanh"}   # the op that gives the gate away
_ELEMENTWISE = frozenset({"Mul", "Div", "Add", "Sub", "Pow"})
_RESHAPES = ("Squeeze", "Unsqueeze", "Reshape")
_SHAPE_AND_SUM = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "ReduceSum"})


@dataclasses.dataclass
class CodedExperts:
    """Expert weights [E, ...] an export computes from low-bit codes; their K axis is known once the
    projection they feed is."""
    value: Value

    @property
    def shape(self) -> tuple:
        return tuple(self.value.shape)

    @property
    def ndim(self) -> int:
        return len(self.value.shape)


@dataclasses.dataclass
class ExpertCodes:
    """Quantized expert weights in MatMul layout: codes [E, in, out], scales [E, ceil(in / block), out]."""
    codes: np.ndarray
    scales: np.ndarray
    block_size: int

    def columns(self, cols: np.ndarray) -> "ExpertCodes":
        return ExpertCodes(self.codes[:, :, cols], self.scales[:, :, cols], self.block_size)

    def dequantized(self) -> np.ndarray:
        """The float32 weights [E, in, out] (for the fusion's own numerical check)."""
        s = np.repeat(self.scales, self.block_size, axis=1)[:, :self.codes.shape[1]]
        return self.codes.astype(np.float32) * s

    def reblocked(self, block: int) -> "ExpertCodes":
        """The same weights with blocks of `block` k (a divisor of this block size, or any size where one block
        spans K): scales repeated."""
        kb = -(-self.codes.shape[1] // block)
        return ExpertCodes(self.codes, self.scales[:, np.arange(kb) * block // self.block_size], block)


@dataclasses.dataclass
class Projection:
    """One expert weight tensor, gathered per (token, expert) and multiplied in a batched MatMul."""
    gather: Node
    matmul: Node
    weights: np.ndarray           # [E, in, out]: what each expert multiplies by, in MatMul layout
    operand: Value                # what the gathered weights multiply
    quant: Optional[ExpertCodes] = None     # the codes behind `weights`, for weights computed from them

    @property
    def out(self) -> Value:
        return self.matmul.outputs[0]


@dataclasses.dataclass
class Experts:
    w_gate: np.ndarray            # [E, H, I]
    w_up: np.ndarray              # [E, H, I]
    w_down: np.ndarray            # [E, I, H]
    activation: str
    clamp: float
    down: Projection
    alpha: float = 1.0            # silu's sigmoid slope
    up_offset: float = 0.0
    b_gate: Optional[np.ndarray] = None     # [E, I]
    b_up: Optional[np.ndarray] = None       # [E, I]
    b_down: Optional[np.ndarray] = None     # [E, H]
    quant: Optional[tuple[ExpertCodes, ExpertCodes, ExpertCodes]] = None    # gate, up, down codes


@dataclasses.dataclass
class MoEBlock:
    router: Router
    experts: Experts
    inputs: list[Value]           # x (and token_ids for hash routing)
    output: Value                 # the combined routed output

    def attrs(self) -> dict:
        e = self.experts
        extra = {k: float(v) for k, v, default in (("alpha", e.alpha, 1.0), ("up_offset", e.up_offset, 0.0))
                 if v != default}
        if e.quant is not None:
            bits, fmt = dq_format(e.quant[0].codes.dtype)
            extra.update(bits=bits, block_size=e.quant[0].block_size, format=fmt)
        return {**self.router.attrs(), "activation": e.activation, "clamp": float(e.clamp), **extra}


# ---- the pass --------------------------------------------------------------------------------

@register_pass("fuse-moe")
def fuse_moe(graph: Graph) -> PassResult:
    """Routed mixture-of-experts blocks (router, top-k, gathered SwiGLU experts, combine) -> polyport::MoE."""
    result = PassResult()
    claimed: set[int] = set()          # nodes of every block looked at (fused or not)
    candidates = selection_candidates(graph.nodes)
    routers = [(node, idx) for node, idx in candidates if _selects_expert_weights(idx)]
    for node, idx in routers:
        if node.graph is not graph or id(node) in claimed:
            continue
        try:
            block = match_moe(node, idx, claimed)
        except NoMatch as e:
            result.notes.append(f"{node.name}: {e}")
            claimed.update(id(n) for n in _router_nodes(node))   # its group top-ks are no separate miss
            continue
        _rewrite(graph, block)
        result.count("MoE")
    claimed.update(id(n) for n, _ in routers)
    for node in graph.nodes:
        if node.op_type == "TopK" and not node.domain and id(node) not in claimed:
            result.notes.append(f"{node.name}: a top-k whose indices select no expert weights "
                                "(not followed by an expert combine)")
    return result


def match_moe(selection: Node, idx: Value, claimed: set[int]) -> MoEBlock:
    """The MoE block whose experts `idx` selects, checked numerically. Raises NoMatch."""
    router = analyze_router(selection, idx)
    inputs = [router.x]
    if router.token_ids is not None:
        if router.token_ids.shape != router.x.shape[:-1]:
            raise NoMatch(f"token ids %{router.token_ids.name} {router.token_ids.type} do not have the hidden "
                         f"states' leading shape {tuple(router.x.shape[:-1])}")
        inputs.append(router.token_ids)
    stop = {id(v) for v in inputs}
    try:
        claimed.update(id(n) for n in region_nodes(inputs, router.weights))
    except ValueError as e:
        raise NoMatch(f"the routing weights depend on more than the hidden states: {e}") from None
    experts = _read_experts(router, stop)
    output = _combined_output(router, experts.down, stop)
    block = MoEBlock(router, experts, inputs, output)
    claimed.update(id(n) for n in _private_region(block))
    _check_numerics(block)
    return block


def _check_numerics(block: MoEBlock) -> None:
    """The final word: polyport::MoE computes what the block computes, on random inputs.

    In half precision the block's own top-k breaks near-ties by rounding (bf16 sigmoid scores tie often)
    where polyport::MoE scores in fp32, so one trial in three may pick another expert for some token; a
    wrong proposal (another scoring, scale, clamp, ...) fails every trial."""
    dtype = block.router.x.dtype
    trials = 1 if dtype is not None and dtype.name == "f32" else 3
    failures = []
    for seed in range(trials):
        try:
            equivalent(block.inputs, block.output, "MoE", _operands(block, _detached), block.attrs(), seed=seed,
                       int_high=_int_high(block.router))
        except NoMatch as e:
            failures.append(str(e))
    if 2 * len(failures) >= trials:
        raise NoMatch(f"polyport::MoE{_describe(block)} does not compute %{block.output.name}: {failures[0]}")


def _rewrite(graph: Graph, block: MoEBlock) -> None:
    def add(name: str, arr: np.ndarray) -> Value:
        return graph.add_constant(name, arr)
    replace_with_fused(block.output, "MoE", _operands(block, add), block.attrs())
    graph.remove_unused()


# ---- operands --------------------------------------------------------------------------------

def _operands(block: MoEBlock, make_const) -> list[Optional[Value]]:
    """polyport::MoE's inputs; new constants (re-laid-out weights) are made by `make_const(name, array)`."""
    r, e = block.router, block.experts
    stem = _stem(r)
    router_w = r.router_w_value if r.router_w_value is not None else make_const(f"{stem}.router_w", r.router_w)
    weights = [("w_gate", e.w_gate), ("w_up", e.w_up), ("w_down", e.w_down)]
    if e.quant is not None:
        weights = [(name, _moe_codes(q.codes)) for (name, _), q in zip(weights, e.quant)]
    ops = [r.x, router_w, r.e_bias] + [make_const(f"{stem}.{name}", w) for name, w in weights] + \
        [r.hash_table, r.token_ids]
    if e.quant is not None:
        ops += [make_const(f"{stem}.{name}_scales", q.scales) for name, q in zip(("gate", "up", "down"), e.quant)]
    if r.router_b is not None:
        b = r.router_b if r.router_b.shape == (r.num_experts,) else \
            make_const(f"{stem}.router_b", const_of(r.router_b).reshape(r.num_experts))
        ops += [None] * (MOE_INPUTS.index("router_b") - len(ops)) + [b]
    for name, arr in (("b_gate", e.b_gate), ("b_up", e.b_up), ("b_down", e.b_down)):
        if arr is not None:
            ops += [None] * (MOE_INPUTS.index(name) - len(ops)) + [make_const(f"{stem}.{name}", arr)]
    while ops[-1] is None:
        ops.pop()
    return ops


def _moe_codes(codes: np.ndarray) -> np.ndarray:
    """Codes [E, K, N] as the MoE stores them: e4m3fn as its bytes, int8 as is, int4 two per byte along K."""
    if codes.dtype == np.int8:
        return codes
    if dq_format(codes.dtype)[0] == 4:
        return np.stack([pack_int4(c.T.astype(np.int8)).T for c in codes])
    return codes.view(np.uint8)


def _detached(name: str, arr: np.ndarray) -> Value:
    """A constant outside any graph: enough for `equivalent`, and nothing to clean up if the check fails."""
    return Value(name, TensorType(dtypes.from_numpy(arr.dtype), arr.shape), const=arr)


def _stem(router: Router) -> str:
    """A readable prefix for the new constants: the router weight's name without '.gate.weight'."""
    producer = router.logits.producer
    name = next((v.name for v in producer.inputs[1:2] if v is not None), "moe")
    for suffix in (".weight", ".gate"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name or "moe"


def _int_high(router: Router) -> Optional[dict[str, int]]:
    if router.token_ids is None:
        return None
    return {router.token_ids.name: int(router.hash_table.const.shape[0])}


def _describe(block: MoEBlock) -> str:
    """The proposal in a few words, for notes: (top_k=2, sigmoid, e_bias, groups 2/4, renormalize, ...)."""
    a, r = block.attrs(), block.router
    words = [f"top_k={a['top_k']}", a["scoring"]]
    words += ["e_bias"] * (r.e_bias is not None) + ["hash"] * (r.hash_table is not None)
    words += [f"groups {a['topk_group']}/{a['n_group']}"] * (a["n_group"] > 1) + ["renormalize"] * a["renormalize"]
    words += [f"scale {a['routed_scaling']:g}"] * (a["routed_scaling"] != 1.0)
    words += [f"clamp {a['clamp']:g}"] * (a["clamp"] != 0.0)
    words += [f"alpha {a['alpha']:g}" for _ in range("alpha" in a)]
    words += [f"up + {a['up_offset']:g}" for _ in range("up_offset" in a)]
    words += ["router bias"] * (r.router_b is not None) + ["expert biases"] * (block.experts.b_down is not None
                                                                              or block.experts.b_gate is not None)
    return f"({', '.join(words)})"


# ---- experts ---------------------------------------------------------------------------------

def _index_values(idx: Value):
    """`idx` and every reshaped copy of it (the exporter flattens and unsqueezes the expert ids)."""
    stack, seen = [idx], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        yield v
        for user, slot in v.uses:
            if user.op_type in INDEX_SHAPE_OPS and not user.domain and slot == 0:
                stack.append(user.outputs[0])


def _weight_gather(user: Node, slot: int) -> Union[np.ndarray, CodedExperts, None]:
    """The constant float tensor `user` gathers rows of by expert id (input `slot`), or the expert weights
    [E, a, b] it computes from low-bit codes, else None."""
    if user.domain or slot != 1 or user.op_type not in ("Gather", "GatherND"):
        return None
    data = const_of(user.inputs[0])
    if data is None and computed_from_codes(user.inputs[0]) and len(user.inputs[0].shape) == 3:
        data = CodedExperts(user.inputs[0])
    elif data is None or data.ndim < 2 or not is_float(data):
        return None
    if user.op_type == "Gather" and user.attrs.get("axis", 0) != 0:
        return None
    if user.op_type == "GatherND" and (user.attrs.get("batch_dims", 0) != 0 or user.inputs[1].shape is None
                                       or user.inputs[1].shape[-1] != 1):
        return None
    return data


def _selects_expert_weights(idx: Value) -> bool:
    """Do these indices gather rows of a constant weight tensor [E, a, b] (directly or reshaped)?"""
    return any(w is not None and w.ndim >= 3
               for v in _index_values(idx) for user, slot in v.uses for w in [_weight_gather(user, slot)])


def _expert_gathers(router: Router) -> tuple[list[Node], list[Node]]:
    """(the gathers of expert weight matrices, of expert bias rows [E, out]) by the selected indices;
    anything else the index feeds is a reason."""
    num_experts, found, biases = router.num_experts, [], []
    for v in _index_values(router.indices):
        if v.is_graph_output:
            raise NoMatch(f"the expert index %{v.name} is also a graph output")
        for user, slot in v.uses:
            if user in router.weight_gathers or (user.op_type in INDEX_SHAPE_OPS and slot == 0):
                continue
            data = _weight_gather(user, slot)
            if data is not None and data.shape[0] == num_experts and data.ndim == 3:
                found.append(user)
            elif data is not None and data.shape[0] == num_experts and data.ndim == 2:
                biases.append(user)
            elif data is not None:
                raise NoMatch(f"the expert index also selects %{user.inputs[0].name} {list(data.shape)}, a "
                             "per-expert tensor besides the SwiGLU weights (a bias or scale polyport::MoE lacks)")
            else:
                raise NoMatch(f"the expert index also feeds {_node_text(user)}: the experts would not all "
                             "compute the same function of their weights")
    return found, biases


def _projection(gather: Node) -> Projection:
    g, flipped = gather.outputs[0], False
    user = _only_user(g)
    if user is not None and user.op_type == "Transpose" and _swaps_last_two(user.attrs.get("perm"), len(g.shape)):
        g, flipped, user = user.outputs[0], True, _only_user(user.outputs[0])
    if user is None or user.op_type != "MatMul" or user.domain:
        raise NoMatch(f"the gathered expert weights %{g.name} do not feed one batched MatMul")
    # x @ W[e]: W[e] is [in, out] already; W[e] @ x: W[e] is [out, in] (torch's F.linear layout)
    x_first = user.inputs[1] is g
    operand = user.inputs[0] if x_first else user.inputs[1]
    in_axis = 1 if x_first != flipped else 2        # the axis of the gathered tensor each expert reduces
    data = const_of(gather.inputs[0])
    if data is not None:
        return Projection(gather, user, data if in_axis == 1 else data.transpose(0, 2, 1), operand)
    try:
        b = block_codes(gather.inputs[0], in_axis, gather.graph.opset_imports)
    except NoMatch as e:
        raise NoMatch(f"expert weights %{gather.inputs[0].name}: {e}") from None
    codes, scales = (b.codes, b.scales) if in_axis == 1 else (b.codes.transpose(0, 2, 1), b.scales.transpose(0, 2, 1))
    q = ExpertCodes(codes, scales, b.block_size)
    return Projection(gather, user, q.dequantized(), operand, q)


def _swaps_last_two(perm, rank: int) -> bool:
    return perm is not None and list(perm) == list(range(rank - 2)) + [rank - 1, rank - 2]


def _read_experts(router: Router, stop: set[int]) -> Experts:
    gathers, bias_gathers = _expert_gathers(router)
    projections = [_projection(g) for g in gathers]
    biases = _biases(bias_gathers, projections)
    adds = {id(add) for add, _ in biases.values()}
    if len(projections) not in (2, 3):
        raise NoMatch(f"the selected experts use {len(projections)} weight tensors; SwiGLU experts have a fused "
                     "gate_up and a down projection, or gate, up and down")
    downs = [p for p in projections if any(_depends_on(p.operand, q.out, stop) for q in projections if q is not p)]
    if len(downs) != 1:
        raise NoMatch("cannot tell the experts' down projection (the one that reads the others' results)")
    down = downs[0]
    ups = [p for p in projections if p is not down]
    if len(ups) == 1:
        parts = [(v, ups[0], cols) for v, cols in _split_parts(ups[0], adds)]
    else:
        parts = [(p.out, p, np.arange(p.weights.shape[2])) for p in ups]
    gates = [(part, act) for part in parts for act in [_gate_activation(part[0])] if act is not None]
    if len(gates) != 1 or len(parts) != 2:
        raise NoMatch("cannot tell the experts' gate from their up projection (expected exactly one half to go "
                     "through a SiLU/GELU activation)")
    (gate_value, gate_proj, gate_cols), (activation, clamp, alpha) = gates[0]
    up_value, up_proj, up_cols = next(p for p in parts if p[0] is not gate_value)
    w_gate = np.ascontiguousarray(gate_proj.weights[:, :, gate_cols])
    w_up = np.ascontiguousarray(up_proj.weights[:, :, up_cols])
    w_down = np.ascontiguousarray(down.weights)

    def bias(proj, cols):
        b = biases.get(id(proj))
        return None if b is None else np.ascontiguousarray(b[1][:, cols])
    e, h = router.num_experts, router.x.shape[-1]
    inter = w_gate.shape[2]
    if w_up.shape != (e, h, inter) or w_down.shape != (e, inter, h):
        raise NoMatch(f"expert weights do not fit SwiGLU experts of width {inter} over hidden size {h}: "
                     f"gate {list(w_gate.shape)}, up {list(w_up.shape)}, down {list(w_down.shape)}")
    b_gate, b_up = bias(gate_proj, gate_cols), bias(up_proj, up_cols)
    b_down = bias(down, np.arange(w_down.shape[2]))
    if (b_gate is None) != (b_up is None):
        b_gate = np.zeros(w_gate.shape[::2], w_gate.dtype) if b_gate is None else b_gate
        b_up = np.zeros(w_up.shape[::2], w_up.dtype) if b_up is None else b_up
    quant = _expert_codes([gate_proj, up_proj, down], [gate_cols, up_cols, np.arange(w_down.shape[2])])
    return Experts(w_gate, w_up, w_down, activation, clamp, down, alpha, _up_offset(up_value, clamp), b_gate, b_up,
                   b_down, quant)


def _expert_codes(projections: list[Projection], cols: list[np.ndarray]):
    """(gate, up, down) codes for experts computed from low-bit codes, with one block size for the three;
    None for f32 experts. Raises NoMatch for a mix the MoE cannot hold (it dequantizes at run time)."""
    coded = [p.quant for p in projections]
    if all(q is None for q in coded):
        return None
    formats = {None if q is None else dq_format(q.codes.dtype) for q in coded}
    if None in formats or len(formats) != 1:
        raise NoMatch("the expert projections are not all computed from codes of one format "
                      f"({', '.join(sorted(str(f) for f in formats))})")
    blocked = [q.block_size for q in coded if q.block_size < q.codes.shape[1]]    # (the rest: one block per column)
    block = math.gcd(*blocked) if blocked else max(q.block_size for q in coded)
    codes = tuple(q.columns(c).reblocked(block) for q, c in zip(coded, cols))
    if formats.pop()[0] == 4 and any(q.codes.shape[1] % 2 for q in codes):
        raise NoMatch("int4 expert codes with an odd K")
    return codes


def _biases(gathers: list[Node], projections: list[Projection]) -> dict[int, tuple[Node, np.ndarray]]:
    """id(projection) -> (the Add, the bias rows [E, out]) for each gathered expert bias added to a projection's
    output (after reshapes); raises NoMatch for a per-expert tensor used any other way."""
    out = {}
    for g in gathers:
        data = const_of(g.inputs[0])
        add = _only_user(g.outputs[0])
        other = None if add is None or add.op_type != "Add" or add.domain else \
            add.inputs[1] if add.inputs[0] is g.outputs[0] else add.inputs[0]
        while other is not None and other.producer is not None and other.producer.op_type in _RESHAPES:
            other = other.producer.inputs[0]
        proj = next((p for p in projections if other is p.out and p.weights.shape[2] == data.shape[1]), None)
        if proj is None or id(proj) in out:
            raise NoMatch(f"the expert index also selects %{g.inputs[0].name} {list(data.shape)}, a per-expert "
                          "tensor that is not a bias added to one projection's output")
        out[id(proj)] = (add, data)
    return out


def _up_offset(up: Value, clamp: float) -> float:
    """The constant the up half is offset by before its product with the gate (gpt-oss: up + 1), else 0."""
    v = up
    while (user := _only_user(v)) is not None and (user.op_type in _RESHAPES or user.op_type == "Clip" and clamp):
        v = user.outputs[0]
    if user is not None and user.op_type == "Add" and not user.domain:
        c = scalar_of(user.inputs[1] if user.inputs[0] is v else user.inputs[0])
        return 0.0 if c is None else c
    return 0.0


def _split_parts(proj: Projection, adds: set[int] = frozenset()) -> list[tuple[Value, np.ndarray]]:
    """(value, columns of the projection's output) for each part a fused gate_up projection is split into
    (past reshapes and the bias Add among `adds`)."""
    out_size = proj.weights.shape[2]
    v = proj.out
    while (user := _only_user(v)) is not None and (user.op_type in _RESHAPES or id(user) in adds) \
            and v.shape is not None and out_size in v.shape:
        v = user.outputs[0]
    users = v.users
    if v.shape is None or not users:
        raise NoMatch(f"the fused gate_up projection %{v.name} is not split into gate and up")
    rank = len(v.shape)
    if len(users) == 1 and users[0].op_type == "Split":
        node = users[0]
        axis = node.attrs.get("axis", 0) % rank
        if v.shape[axis] != out_size:
            raise NoMatch(f"{node.name}: splits %{v.name} along an axis that is not the projection's output")
        sizes = const_of(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if sizes is None:
            sizes = node.attrs.get("split") or [out_size // len(node.outputs)] * len(node.outputs)
        bounds = np.cumsum([0] + [int(s) for s in np.asarray(sizes).reshape(-1)])
        return [(o, np.arange(bounds[i], bounds[i + 1])) for i, o in enumerate(node.outputs)]
    if all(u.op_type == "Slice" and not u.domain for u in users):
        return [(u.outputs[0], _slice_columns(u, v, out_size)) for u in users]
    raise NoMatch(f"the fused gate_up projection %{v.name} is not split into gate and up "
                 f"(it feeds {', '.join(u.op_type for u in users)})")


def _slice_columns(node: Node, v: Value, out_size: int) -> np.ndarray:
    rank = len(v.shape)
    args = [const_of(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
            for i in range(1, 5)]
    starts, ends, axes, steps = args
    if starts is None or ends is None:
        raise NoMatch(f"{node.name}: slice bounds are not constant")
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    steps = [1] * len(axes) if steps is None else [int(s) for s in steps.reshape(-1)]
    cols = np.arange(out_size)
    for a, s, e, st in zip(axes, starts.reshape(-1), ends.reshape(-1), steps):
        if v.shape[a] == out_size:
            return cols[slice(int(s), int(min(max(e, -(2 ** 62)), 2 ** 62)), st)]
        if not (int(s) == 0 and int(e) >= 2 ** 31 and st == 1):
            raise NoMatch(f"{node.name}: slices an axis other than the projection's output")
    raise NoMatch(f"{node.name}: does not slice the projection's output")


def _gate_activation(v: Value) -> Optional[tuple[str, float, float]]:
    """(activation, clamp, alpha) if `v` goes through an activation before its product with the up half
    (alpha: a scalar multiplying the gate on its way into the sigmoid, gpt-oss's 1.702)."""
    clamp = 0.0
    while (user := _only_user(v)) is not None and user.op_type in ("Squeeze", "Unsqueeze", "Reshape"):
        v = user.outputs[0]
    if user is not None and user.op_type in ("Clip", "Min") and not user.domain:
        if user.op_type == "Clip":
            lo = scalar_of(user.inputs[1]) if len(user.inputs) > 1 and user.inputs[1] is not None else None
            hi = scalar_of(user.inputs[2]) if len(user.inputs) > 2 and user.inputs[2] is not None else None
        else:
            lo, hi = None, scalar_of(user.inputs[1] if user.inputs[0] is v else user.inputs[0])
        if hi is None or (lo is not None and lo > -1e30):
            return None                 # clamped on both sides: the up half's SwiGLU limit
        clamp, v = hi, user.outputs[0]
    frontier = [v]
    for _ in range(4):                  # x * sigmoid(x); 0.5 x (1 + erf(x / sqrt 2)); the tanh form
        nxt = []
        for value in frontier:
            for u in value.users:
                if u.op_type in ACTIVATION_OPS and not u.domain:
                    return ACTIVATION_OPS[u.op_type], float(clamp), _slope(u, v)
                if u.op_type in _ELEMENTWISE and not u.domain:
                    nxt.append(u.outputs[0])
        frontier = nxt
    return None


def _slope(act: Node, gate: Value) -> float:
    """alpha where the sigmoid reads alpha * gate (SiLU with a slope), else 1."""
    p = act.inputs[0].producer
    if act.op_type == "Sigmoid" and p is not None and p.op_type == "Mul" and not p.domain and gate in p.inputs:
        c = scalar_of(p.inputs[1] if p.inputs[0] is gate else p.inputs[0])
        return 1.0 if c is None else c
    return 1.0


# ---- combine and region ----------------------------------------------------------------------

def _combined_output(router: Router, down: Projection, stop: set[int]) -> Value:
    """From the down projection forward to the first value shaped like x that the routing weights reach
    (and past a trailing sum over a single expert slot, when top_k is 1)."""
    v = down.out
    for _ in range(16):
        if v.shape == router.x.shape and _depends_on(v, router.weights, stop):
            return _past_reshapes(v)
        user = _only_user(v)
        if user is None:
            raise NoMatch(f"the expert outputs (%{v.name}) are not combined into one value shaped like the hidden "
                         f"states by the routing weights ({len(v.users)} users)")
        v = user.outputs[0]
    raise NoMatch(f"no weighted combine of the expert outputs within 16 ops of %{down.out.name}")


def _past_reshapes(v: Value) -> Value:
    """The last value of v's shape reached from v by reshapes and reductions alone (v -> [T, 1, H] -> sum)."""
    best, u = v, v
    for _ in range(3):
        user = _only_user(u)
        if user is None or user.domain or user.op_type not in _SHAPE_AND_SUM or len(user.outputs) != 1:
            break
        u = user.outputs[0]
        if u.shape == v.shape:
            best = u
    return best


def _private_region(block: MoEBlock) -> list[Node]:
    """The block's nodes; raises if one that computes on the hidden states is also used outside it."""
    try:
        nodes = region_nodes(block.inputs, block.output)
    except ValueError as e:
        raise NoMatch(f"the combined output depends on more than the hidden states: {e}") from None
    inside = {id(n) for n in nodes}
    live = {id(block.router.x)}          # token-id arithmetic (hash routing) may be shared between layers
    roles = {id(block.router.logits): "the router logits", id(block.router.scores): "the router scores",
             id(block.router.indices): "the selected experts", id(block.router.weights): "the routing weights"}
    for node in nodes:                   # topological order
        if not any(v is not None and id(v) in live for v in node.inputs):
            continue                     # shape vectors and constant-only nodes may be shared
        live.update(id(o) for o in node.outputs)
        if node is block.output.producer:
            continue
        for o in node.outputs:
            what = roles.get(id(o), f"%{o.name}")
            if o.is_graph_output:
                raise NoMatch(f"{what} (%{o.name}) is also a graph output")
            outside = [u for u in o.users if id(u) not in inside]
            if outside:
                raise NoMatch(f"{what} (%{o.name}) are also read by {_node_text(outside[0])} outside the MoE block")
    return nodes


def _depends_on(v: Value, target: Value, stop: set[int]) -> bool:
    """Is `v` computed from `target` (not looking past the `stop` values)?"""
    seen: set[int] = set()
    stack = [v]
    while stack:
        u = stack.pop()
        if u is target:
            return True
        if id(u) in seen or id(u) in stop or u.const is not None or u.producer is None:
            continue
        seen.add(id(u))
        stack.extend(i for i in u.producer.inputs if i is not None)
    return False


def _router_nodes(selection: Node, budget: int = 64) -> list[Node]:
    """The nodes a selection is computed from, back to the router projection (for claiming after a miss)."""
    found, stack, seen = [], [v for v in selection.inputs if v is not None], set()
    while stack and len(found) < budget:
        v = stack.pop()
        node = v.producer
        if node is None or id(node) in seen or v.const is not None:
            continue
        seen.add(id(node))
        found.append(node)
        if node.op_type not in ("MatMul", "Gemm"):
            stack.extend(i for i in node.inputs if i is not None)
    return found


def _node_text(node: Node) -> str:
    return node.name if node.name.startswith(node.op_type) else f"{node.op_type} {node.name}"


def _only_user(v: Value) -> Optional[Node]:
    users = v.users
    return users[0] if len(users) == 1 and not v.is_graph_output else None

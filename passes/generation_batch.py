"""Give the derived generation programs of a batch-1 export a symbolic batch.

Every corpus export fixes batch at 1 (`input_ids [1, seq]`), so the programs
derived from it would decode a batch of B sequences one cache at a time. The
batch is recovered by meaning: the programs' inputs get a symbolic `batch`
where the export has its constant 1 (ids, lengths / past_len, caches), every
node's type is inferred again in order, and the two places where the export
spells the batch as a constant are rewritten:

- a Reshape whose target starts with the constant 1 while its input carries the
  batch (`[1, -1, 4, 16]`, `[1, -1, 64]` after a MoE's `[-1, 64]`) gets
  `[batch, ...]` (a `ShapeValue`);
- decode's positions `past_len + arange(step)` become `[batch, step]`
  (`past_len[:, None] + arange(step)`), replacing the `[1, step]` the export
  unsqueezes them to.

Anything else that would drop the batch (a node whose input carries it and
whose output does not, a shape computed over the tokens such as a MoE router's
`ConstantOfShape([seq, 1])`, which means batch x seq once batched) makes the rewrite fail: the caller keeps the batch-1
programs and the runtime decodes one sequence per cache.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..ir import dtypes
from ..ir.graph import Graph, Node, Value
from ..ir.infer import infer_node
from ..ir.ops import POLYPORT_DOMAIN
from ..ir.symbolic import sym
from ..ir.types import TensorType
from ._match_util import ints

BATCH = "batch"
_SHAPE_OPS = {"Shape", "Size"}        # their outputs describe the batch without carrying it


def make_batch_generic(g: Graph) -> Optional[str]:
    """Rewrite the derived program `g` (inputs: input_ids [1, step], lengths | past_len [1], caches
    [1, ...]) in place to a symbolic batch. None on success, else why not (then `g` is unusable)."""
    batch = sym(BATCH)
    for v in g.inputs:
        shape = v.shape
        if not shape or shape[0] != 1:
            return f"program input {v.name} has no batch-1 leading dim"
        v.type = TensorType(v.dtype, (batch,) + tuple(shape[1:]))
    past = next((v for v in g.inputs if v.name == "past_len"), None)
    if past is not None:
        why = _batched_positions(g, past)
        if why:
            return why
    seq = g.inputs[0].shape[1].symbols if len(g.inputs[0].shape) > 1 and not isinstance(g.inputs[0].shape[1], int) \
        else frozenset()
    g.sort()
    for node in list(g.nodes):
        if node.op_type == "Reshape" and not node.domain and _carries(node.inputs[0]):
            _reshape_batch(g, node, batch)
        if node.op_type == "ShapeValue" and node.domain == POLYPORT_DOMAIN:
            continue
        why = _token_count(node, seq)
        if why:
            return why
        try:
            types = _infer(node, g)
        except Exception as e:  # noqa: BLE001 - any inference failure means the batch cannot be told here
            return f"node {node.name} ({node.op_type}): {e}"
        for v, t in zip(node.outputs, types):
            v.type = t
        if (node.op_type not in _SHAPE_OPS and any(_carries(v) for v in node.inputs if v is not None)
                and not any(_carries(v) for v in node.outputs)):
            return f"node {node.name} ({node.op_type}) drops the batch dim"
    outs = g.outputs
    if not all(v.shape and v.shape[0] == batch for v in outs):
        bad = next(v for v in outs if not (v.shape and v.shape[0] == batch))
        return f"program output {bad.name} has shape {bad.shape}, not [batch, ...]"
    return None


def retype(g: Graph) -> None:
    """Infer every node's output types again, in order (after the derivation moved some inputs)."""
    for node in g.nodes:
        for v, t in zip(node.outputs, _infer(node, g)):
            v.type = t


def _infer(node: Node, g: Graph) -> list:
    """The node's types; where ONNX's inference gives up on symbolic dims, the two nodes the derivation
    adds: GatherND of the last rows, and decode's `n_new = Expand(step, Shape(past_len))`."""
    if node.domain:
        return infer_node(node, g.opset_imports)
    if node.op_type == "GatherND":
        data, idx = node.inputs
        k = idx.shape[-1]
        if not isinstance(k, int):
            raise ValueError("GatherND with a symbolic index depth")
        return [TensorType(data.dtype, tuple(idx.shape[:-1]) + tuple(data.shape[node.attrs.get("batch_dims", 0) + k:]))]
    shape_of = node.inputs[1].producer if node.op_type == "Expand" else None
    if shape_of is not None and shape_of.op_type == "Shape" and not shape_of.attrs and node.inputs[0].shape == (1,):
        return [TensorType(node.inputs[0].dtype, shape_of.inputs[0].shape)]
    return infer_node(node, g.opset_imports)


def _token_count(node: Node, seq: frozenset) -> Optional[str]:
    """A shape the export computed over its tokens (`[seq, 1]` of a MoE router's mask) means batch x seq
    once batched, which a ShapeValue cannot tell from seq: only targets led by the batch's 1 are safe
    (a Reshape's, rewritten above, or an Expand's, which keeps the input's batch)."""
    for v in node.inputs:
        sv = v.producer if v is not None else None
        if sv is None or sv.op_type != "ShapeValue" or sv.domain != POLYPORT_DOMAIN:
            continue
        dims = sv.attrs["dims"]
        if not any(not isinstance(d, int) and d.symbols & seq for d in dims):
            continue
        if node.op_type == "Range" and not node.domain:
            continue                  # the positions: the same for every sequence (decode's are rewritten above)
        if node.op_type in ("Reshape", "Expand") and not node.domain and (dims[0] == 1 or not isinstance(
                dims[0], int) and BATCH in dims[0].symbols):
            continue
        return f"node {node.name} ({node.op_type}) takes a shape over the tokens ({dims}) that a batch would change"
    return None


def _carries(v: Optional[Value]) -> bool:
    return (v is not None and isinstance(v.type, TensorType) and v.shape is not None
            and any(not isinstance(d, int) and d is not None and BATCH in d.symbols for d in v.shape))


def _reshape_batch(g: Graph, node: Node, batch) -> None:
    """A target shape that spells the batch as its leading constant 1 gets the symbolic batch."""
    target = node.inputs[1]
    if target.const is not None:
        dims = ints(target)
    elif target.producer is not None and target.producer.op_type == "ShapeValue":
        dims = list(target.producer.attrs["dims"])
    else:
        return
    if not dims or not isinstance(dims[0], (int, np.integer)) or dims[0] != 1:
        return
    sv = g.make_node("ShapeValue", [], attrs={"dims": [batch] + list(dims[1:]), "scalar": 0},
                     domain=POLYPORT_DOMAIN, name=f"{node.name}_batch", before=node)
    sv.outputs[0].type = TensorType(dtypes.I64, (len(dims),))
    node.set_input(1, sv.outputs[0])


def _batched_positions(g: Graph, past: Value) -> Optional[str]:
    """decode's `Add(arange, past_len)` [step] (batch 1) -> `past_len[:, None] + arange[None, :]` [batch, step],
    in place of each `Unsqueeze(positions, 0)` ([1, step]) the export made of them."""
    adds = [n for n, _ in past.uses if n.op_type == "Add" and not n.domain
            and any(i is not None and i is not past and i.producer is not None and i.producer.op_type == "Range"
                    for i in n.inputs)]
    for add in adds:
        arange = next(i for i in add.inputs if i is not past)
        users = list(add.outputs[0].uses)
        if not users or any(u.op_type != "Unsqueeze" or u.domain or 0 not in (ints(u.inputs[1]) or [])
                            or min(ints(u.inputs[1])) < 0 for u, _ in users):
            return f"positions {add.name} are not unsqueezed to [1, step, ...]"
        rows = _make(g, "Unsqueeze", [past, _axis(g, [-1])], add)
        cols = _make(g, "Unsqueeze", [arange, _axis(g, [0])], add)
        positions = _make(g, "Add", [rows, cols], add, name="positions")
        for user, _ in users:           # axis 0 is now the batch; the other axes apply as they did
            rest = [a for a in ints(user.inputs[1]) if a != 0]
            out = _make(g, "Unsqueeze", [positions, _axis(g, rest)], user) if rest else positions
            user.outputs[0].replace_all_uses_with(out)
            g.remove(user)
        g.remove(add)
    return None


def _axis(g: Graph, axes: list[int]) -> Value:
    name = f"{g.name}.batch_axes_{'_'.join(map(str, axes))}".replace("-", "m")
    return g.constants.get(name) or g.add_constant(name, np.array(axes, np.int64))


def _make(g: Graph, op: str, inputs, before: Node, name: str = "") -> Value:
    node = g.make_node(op, inputs, name=name or op, before=before)
    for v, t in zip(node.outputs, infer_node(node, g.opset_imports)):
        v.type = t
    return node.outputs[0]

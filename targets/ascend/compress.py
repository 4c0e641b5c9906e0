"""KVCompress and SparseIndexer (DeepSeek-V4's compressed attention) -> chains of standard ops CANN takes.

CANN has no operator for either (its sparse-attention kernels take the selected indices, not the
pooling or the indexer itself), and both are light next to the attention they feed, so each is
emitted as the opset-18 chain of its meaning, in float32 as DeepSeek-V4 computes them (the softmax
of the pooling gates and the indexer's scores in fp32), cast to the compute dtype at the end.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...ir.graph import Node
from ...ir.ops import attrs_of
from .emission import F32, dims, lowers

I64, BOOL = TensorProto.INT64, TensorProto.BOOL


class _Chain:
    """Emits one fused node's chain: fresh names under the node's, constants named once."""

    def __init__(self, em, node: Node):
        self.em, self.node = em, node

    def __call__(self, op: str, inputs: list[str], elem: int, shape, attrs=None, tag: str = "") -> str:
        name = self.em.fresh(f"{self.node.name}_{tag or op.lower()}")
        return self.em.emit(op, inputs, [(name, elem, shape)], attrs)[0]

    def ints(self, values, tag: str) -> str:
        return self.em.ints(values, f"{self.node.name}_{tag}")

    def f32(self, value: float, tag: str) -> str:
        return self.em.const(np.array(value, np.float32), f"{self.node.name}_{tag}")

    def length(self, x: str, axis: int, tag: str) -> str:
        """x.shape[axis] as a 1-element int64 tensor."""
        return self("Shape", [x], I64, [1], {"start": axis, "end": axis + 1}, tag)


@lowers("KVCompress")
def kv_compress(em, node: Node) -> None:
    e = _Chain(em, node)
    a = attrs_of(node)
    rate, overlap = a["rate"], bool(a["overlap"])
    kv, gate = (em.get(v, F32) for v in node.inputs[:2])
    b, _, c = dims(node.inputs[0].shape)
    # stored in the compute dtype as every weight is
    bias = e("Cast", [em.get(node.inputs[2], em.compute)], F32, [rate, c], {"to": F32}, tag="bias")
    out_shape = dims(node.outputs[0].shape)
    t = out_shape[1]
    whole = e("Mul", [e("Div", [e.length(kv, 1, "seq"), e.ints([rate], "rate")], I64, [1], tag="windows"),
                      e.ints([rate], "rate_m")], I64, [1], tag="pooled_len")
    zero, one, two, three = (e.ints([i], f"axis{i}") for i in range(4))
    win_shape = e.ints([0, -1, rate, c], "win_shape")

    def windows(x: str, tag: str) -> str:              # [B, S, C] -> [B, T, rate, C], the partial window dropped
        cut = e("Slice", [x, e.ints([0], f"{tag}_start"), whole, one], F32, [b, None, c], tag=f"{tag}_cut")
        return e("Reshape", [cut, win_shape], F32, [b, t, rate, c], tag=f"{tag}_windows")

    kv4 = windows(kv, "kv")
    g4 = e("Add", [windows(gate, "gate"), bias], F32, [b, t, rate, c], tag="gate_biased")
    width = rate
    if overlap:
        d, width = c // 2, 2 * rate

        def slots(x: str, fill: float, tag: str) -> str:
            """Window w-1's first half (window 0: `fill`), then window w's second half, over axis 2."""
            first = e("Slice", [x, zero, e.ints([d], "half"), three], F32, [b, t, rate, d], tag=f"{tag}_first")
            padded = e("Pad", [first, e.ints([0, 1, 0, 0, 0, 0, 0, 0], "shift"), e.f32(fill, f"{tag}_fill")],
                       F32, [b, None, rate, d], tag=f"{tag}_shifted")
            prev = e("Slice", [padded, zero, e.ints([-1], "drop_last"), one], F32, [b, t, rate, d], tag=f"{tag}_prev")
            cur = e("Slice", [x, e.ints([d], "half_s"), e.ints([c], "full"), three], F32, [b, t, rate, d],
                    tag=f"{tag}_cur")
            return e("Concat", [prev, cur], F32, [b, t, width, d], {"axis": 2}, tag=f"{tag}_slots")

        kv4, g4, c = slots(kv4, 0.0, "kv"), slots(g4, float("-inf"), "gate"), d
    w = e("Softmax", [g4], F32, [b, t, width, c], {"axis": 2})
    pooled = e("ReduceSum", [e("Mul", [kv4, w], F32, [b, t, width, c]), two], F32, out_shape, {"keepdims": 0})
    em.emit("Cast", [pooled], [em.out(node.outputs[0], em.compute)], {"to": em.compute})


@lowers("SparseIndexer")
def sparse_indexer(em, node: Node) -> None:
    e = _Chain(em, node)
    a = attrs_of(node)
    top_k, rate = a["top_k"], a["rate"]
    q, k, w = (em.get(v, F32) for v in node.inputs[:3])
    pos = em.get(node.inputs[3])
    if em.elem[pos] != I64:
        pos = e("Cast", [pos], I64, dims(node.inputs[3].shape), {"to": I64})
    b, s, h, dq = dims(node.inputs[0].shape)
    t = dims(node.inputs[1].shape)[1]
    one, two, three = (e.ints([i], f"axis{i}") for i in (1, 2, 3))
    keys = e("Unsqueeze", [e("Transpose", [k], F32, [b, dq, t], {"perm": [0, 2, 1]}), one], F32, [b, 1, dq, t])
    qk = e("Relu", [e("MatMul", [q, keys], F32, [b, s, h, t])], F32, [b, s, h, t])
    qk = e("Mul", [qk, e.f32(float(a["scale"]), "scale")], F32, [b, s, h, t], tag="scaled")
    scores = e("ReduceSum", [e("Mul", [qk, e("Unsqueeze", [w, three], F32, [b, s, h, 1])], F32, [b, s, h, t]),
                             two], F32, [b, s, t], {"keepdims": 0}, tag="scores")
    count = e("Squeeze", [e.length(k, 1, "entries"), e.ints([0], "axis0")], I64, [], tag="entry_count")
    entry = e("Range", [e.ints(0, "r0"), count, e.ints(1, "r1")], I64, [t], tag="entry")
    ready = e("Div", [e("Add", [pos, e.ints(1, "one")], I64, [None, s]), e.ints(rate, "rate")], I64, [None, s],
              tag="ready")
    valid = e("Less", [entry, e("Unsqueeze", [ready, two], I64, [None, s, 1])], BOOL, [None, s, t], tag="valid")
    neg = e.f32(float("-inf"), "neg_inf")
    scores = e("Where", [valid, scores, neg], F32, [b, s, t], tag="causal_scores")
    padded = e("Pad", [scores, e.ints([0, 0, 0, 0, 0, top_k], "pad_k"), neg], F32, [b, s, None],
               tag="padded")                         # top_k columns exist even when T < top_k
    idx = em.emit("TopK", [padded, e.ints([top_k], "k")],
                  [(em.fresh(f"{node.name}_topv"), F32, [b, s, top_k]),
                   (em.fresh(f"{node.name}_topi"), I64, [b, s, top_k])], {"axis": -1, "largest": 1, "sorted": 1})[1]
    hit = e("Equal", [e("Unsqueeze", [idx, three], I64, [b, s, top_k, 1]), entry], BOOL, [b, s, top_k, t])
    chosen = e("ReduceMax", [e("Cast", [hit], F32, [b, s, top_k, t], {"to": F32}), two], F32, [b, s, t],
               {"keepdims": 0}, tag="chosen")
    keep = e("And", [e("Greater", [chosen, e.f32(0.0, "zero")], BOOL, [b, s, t]), valid], BOOL, [b, s, t],
             tag="keep")
    mask = e("Where", [keep, e.f32(0.0, "kept"), neg], F32, [b, s, t], tag="mask3")
    mask = e("Unsqueeze", [mask, one], F32, [b, 1, s, t], tag="mask")
    em.emit("Cast", [mask], [em.out(node.outputs[0], em.compute)], {"to": em.compute})

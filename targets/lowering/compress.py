"""DeepSeek-V4's KVCompress and SparseIndexer (ir/fused/compress.py) as Relax compositions, for every kernel set.

Both are small next to the attention they feed (one pooled entry per `rate` tokens; the indexer's
scores are one [S, H, T] product): each is a handful of Relax ops that FuseOps groups and every
target schedules (cpu with its default schedules, the GPU targets with dlight). They compute in
fp32 as the references do, whatever the storage dtype.
"""
from __future__ import annotations

from ...ir.ops import attrs_of
from . import FLOAT_BF, lowers

NEG_INF = float("-inf")


def _f32(lw, x):
    return x if x.ty.dtype == "float32" else lw.emit(lw.relax.op.astype(x, "float32"))


def _slice(lw, x, axis: int, begin, end):
    """x[begin:end] on `axis`, bounds known to lie within it (no clamping if_then_else left in symbolic
    shapes: the GPU builds' FuseOps cannot infer it)."""
    return lw.emit(lw.relax.op.strided_slice(x, [axis], [begin], [end], assume_inbound=True))


def _stored(lw, x, dtype: str):
    return x if dtype == "float32" else lw.emit(lw.relax.op.astype(x, dtype))


@lowers("polyport::KVCompress", dtypes=FLOAT_BF)
def kv_compress(lw, node):
    op = lw.relax.op
    kv, gate, bias = (_f32(lw, lw.get(v)) for v in node.inputs)
    a = attrs_of(node)
    rate, overlap = a["rate"], bool(a["overlap"])
    b, _, c = lw.shape(kv)
    c = lw.as_int(c)
    if c is None:
        raise lw.unsupported(node, "the channel count must be static")
    t = lw.dim(node.outputs[0].type.shape[1])           # seq // rate, folded at import

    def windows(x):                                      # [B, S, C] -> [B, T, rate, C], the partial window dropped
        x = _slice(lw, x, 1, 0, lw.simplify(t * rate))
        return lw.emit(op.reshape(x, [b, t, rate, c]))

    kv4, g4 = windows(kv), lw.emit(op.add(windows(gate), bias))
    if overlap:
        d = c // 2

        def previous(x, fill: float):                   # window w-1's first half at w; window 0: `fill`
            first = _slice(lw, x, 3, 0, d)
            padded = lw.emit(op.nn.pad(first, [0, 0, 1, 0, 0, 0, 0, 0], "constant", fill))
            return _slice(lw, padded, 1, 0, t)

        def slots(x, fill: float):
            return lw.emit(op.concat([previous(x, fill), _slice(lw, x, 3, d, c)], axis=2))

        kv4, g4 = slots(kv4, 0.0), slots(g4, NEG_INF)
    pooled = lw.emit(op.sum(op.multiply(kv4, lw.emit(op.nn.softmax(g4, axis=2))), axis=[2]))
    return _stored(lw, pooled, lw.get(node.inputs[0]).ty.dtype)


@lowers("polyport::SparseIndexer", dtypes=FLOAT_BF)
def sparse_indexer(lw, node):
    """Every tensor with the entry axis T stays [B, 1, S, T]-shaped (no reshape of it: TVM's reshape
    rewriting cannot split extents like (seq + 5) // 2)."""
    relax = lw.relax
    op = relax.op
    q, k, w = (_f32(lw, lw.get(v)) for v in node.inputs[:3])
    pos = lw.get(node.inputs[3])
    if pos.ty.dtype != "int64":
        pos = lw.emit(op.astype(pos, "int64"))
    a = attrs_of(node)
    top_k, rate = a["top_k"], a["rate"]
    neg = relax.const(NEG_INF, "float32")
    qk = lw.emit(op.nn.relu(op.einsum((q, k), "bshd,btd->bsht")))                              # [B, S, H, T]
    qk = lw.emit(op.multiply(qk, relax.const(float(a["scale"]), "float32")))
    scores = lw.emit(op.sum(op.multiply(qk, op.expand_dims(w, 3)), axis=[2], keepdims=True))  # [B, S, 1, T]
    scores = lw.emit(op.permute_dims(scores, [0, 2, 1, 3]))                                  # [B, 1, S, T]
    entry = lw.emit(op.arange(0, lw.shape(k)[1], 1, "int64"))                                # [T]
    ready = lw.emit(op.floor_divide(op.add(pos, relax.const(1, "int64")), relax.const(rate, "int64")))
    valid = lw.emit(op.less(entry, op.expand_dims(ready, [1, 3])))                          # [B|1, 1, S, T]
    scores = lw.emit(op.where(valid, scores, neg))
    # top_k columns of -inf: top_k entries exist even when T < top_k
    padded = lw.emit(op.nn.pad(scores, [0, 0, 0, 0, 0, 0, 0, top_k], "constant", NEG_INF))
    idx = lw.emit(op.topk(padded, top_k, -1, "indices", True, "int64"))                     # [B, 1, S, top_k]
    hit = lw.emit(op.astype(op.equal(op.expand_dims(idx, 4), entry), "int32"))             # [B, 1, S, top_k, T]
    keep = lw.emit(op.logical_and(op.greater(op.max(hit, axis=[3]), relax.const(0, "int32")), valid))
    mask = lw.emit(op.where(keep, relax.const(0.0, "float32"), neg))                        # [B, 1, S, T]
    return _stored(lw, mask, lw.get(node.inputs[0]).ty.dtype)

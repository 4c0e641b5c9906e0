"""Attention -> CANN FusedInferAttentionScore (BNSD; causal/window as sparse_mode with pre/next_tokens;
sinks through its softmax_lse output: out * sigmoid(lse - sink)).

FusedInferAttentionScore has no logit soft-capping, and none of CANN's fused attention operators
applies a function to the scores before the mask: a `softcap` node is decomposed into standard
ops instead (the limit's fallback): q @ k^T per kv head group (GQA by folding the group into the
query rows, never repeating K/V), scale, c * tanh(s / c), the position and explicit masks, an
fp32 softmax with the sink in its denominator, and P @ v."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...ir.graph import Node, Value
from ...ir.ops import attrs_of
from . import limits as L
from .emission import CANN_DOMAIN, F32, INT_MAX, dims, lowers


# ---- Attention -> FusedInferAttentionScore ---------------------------------------------------
@lowers("Attention")
def attention(em, node: Node) -> None:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    sinks = node.inputs[4] if len(node.inputs) > 4 else None
    a = attrs_of(node)
    causal, window = bool(a["causal"]), a["window"]
    dqk, dv = q.shape[-1], v.shape[-1]
    sparse, pre, nxt = sparse_mode(causal, window)
    d = max(dqk, dv) if isinstance(dqk, int) and isinstance(dv, int) else dqk
    facts = {"dtype": em.device_dtype(node, q, L.FIA), "input_layout": "BNSD", "head_dim": d,
             "num_heads": a["num_heads"], "num_key_value_heads": a["kv_heads"], "sparse_mode": sparse,
             "value_head_dim_equals_qk_head_dim": dqk == dv, "softcap": a["softcap"]}
    if isinstance(q.shape[0], int):
        facts["batch"] = q.shape[0]
    if "softcap" in em.check(node, L.FIA, facts):
        return decomposed(em, node)
    if mask is not None and mask.dtype is not None and mask.dtype.name == "bool" and (causal or window):
        raise L.LimitError(f"node {node.name}: CANN FusedInferAttentionScore takes one atten_mask; a boolean "
                           "mask combined with causal/window masking is not lowered (sparse_mode 0 needs the "
                           "full combined mask)")
    cd = em.compute

    def padded(val: Value, have: int, tag: str) -> str:
        name = em.get(val, cd)
        if have == d:
            return name
        pads = em.ints([0, 0, 0, 0, 0, 0, 0, d - have], f"{node.name}_{tag}_pads")
        return em.emit("Pad", [name, pads], [(em.fresh(f"{node.name}_{tag}_padded"), cd,
                                                dims(val.shape)[:-1] + [d])],
                         note=f"FIA needs equal q/k and v head dims: zero-pad {tag} {have} -> {d}")[0]

    qn, kn, vn = padded(q, dqk, "q"), padded(k, dqk, "k"), padded(v, dv, "v")
    pse = atten = ""
    if mask is not None and mask.dtype.name == "bool":      # (never with causal/window: refused above)
        atten = em.emit("Not", [em.get(mask)], [(em.fresh(f"{node.name}_atten_mask"),
                                                    TensorProto.BOOL, dims(mask.shape))],
                          note="FIA atten_mask: true = masked out")[0]
    elif mask is not None:
        pse = em.get(mask, cd)                              # a float mask adds to the scores
    if sparse in (2, 3, 4):
        atten = compressed_mask(em, node)
    qs = dims(q.shape)
    out_shape = qs[:-1] + [d]
    outs = [(em.fresh(f"{node.name}_fia_out"), cd, out_shape)]
    if sinks is not None:
        outs.append((em.fresh(f"{node.name}_softmax_lse"), F32, qs[:-1] + [1]))
    res = em.emit("FusedInferAttentionScore", [qn, kn, vn, pse, atten], outs,
                    {"num_heads": int(a["num_heads"]), "num_key_value_heads": int(a["kv_heads"]),
                     "scale": float(a["scale"]), "input_layout": "BNSD", "sparse_mode": sparse,
                     "pre_tokens": pre, "next_tokens": nxt, "inner_precise": 0,
                     "softmax_lse_flag": int(sinks is not None)}, CANN_DOMAIN)
    y = res[0]
    final = em.out(node.outputs[0], cd)
    if d != dv:
        target = (em.fresh(f"{node.name}_sliced"), cd, qs[:-1] + [dv]) if sinks is not None else final
        y = em.emit("Slice", [y, em.ints([0], f"{node.name}_o0"), em.ints([dv], f"{node.name}_o1"),
                                em.ints([-1], f"{node.name}_oax")], [target],
                      note=f"drop the zero-padded value features {dv}..{d}")[0]
    if sinks is not None:
        sink_gate(em, node, y, res[1], sinks, qs[:-1], final)
    elif d == dv:
        # FIA's output is the node's output: rename in place
        em.nodes[-1].output[0] = final[0]
        em.plan[-1]["outputs"][0]["name"] = final[0]
        em.elem[final[0]], em.shape[final[0]] = cd, final[2]


def sparse_mode(causal: bool, window: int) -> tuple[int, int, int]:
    """(sparse_mode, pre_tokens, next_tokens) of FIA for causal / sliding-window masking (bottom-right aligned:
    query i of S sees keys up to i + Skv - S; a window w keeps the w - 1 before it)."""
    if causal:
        return (4, window - 1, 0) if window else (3, INT_MAX, 0)
    return (4, window - 1, INT_MAX) if window else (0, INT_MAX, INT_MAX)


def compressed_mask(em, node: Node) -> str:
    """The fixed, compressed 2048 x 2048 upper-triangular atten_mask sparse_mode 2/3/4 take (built once)."""
    if em.fia_mask is None:
        shape = em.ints([2048, 2048], f"{node.name}_mask_shape")
        ones = em.emit("ConstantOfShape", [shape], [(em.fresh(f"{node.name}_ones"), TensorProto.BOOL, [2048, 2048])],
                       {"value": helper.make_tensor("value", TensorProto.BOOL, [1], [True])},
                       note="FIA compressed mask for sparse_mode 2/3/4")[0]
        em.fia_mask = em.emit("Trilu", [ones, em.ints(1, f"{node.name}_diag")],
                              [(em.fresh(f"{node.name}_atten_mask"), TensorProto.BOOL, [2048, 2048])],
                              {"upper": 1}, note="FIA compressed mask for sparse_mode 2/3/4")[0]
    return em.fia_mask


def sink_gate(em, node: Node, y: str, lse: str, sinks: Value, rows: list, final) -> None:
    """Attention sinks: FIA has no sink input; out * sigmoid(lse - sink) is exact (`rows`: the output shape
    without its feature dim)."""
    nh = node.attrs["num_heads"]
    cd = em.compute
    sink = em.get(sinks, F32)
    sink4 = em.emit("Reshape", [sink, em.ints([1, nh, 1, 1], f"{node.name}_sink_shape")],
                    [(em.fresh(f"{node.name}_sink4"), F32, [1, nh, 1, 1])],
                    note="attention sinks: FIA has no sink input; out * sigmoid(lse - sink) is exact")[0]
    diff = em.emit("Sub", [lse, sink4], [(em.fresh(f"{node.name}_lse_minus_sink"), F32, rows + [1])])[0]
    gate = em.emit("Sigmoid", [diff], [(em.fresh(f"{node.name}_sink_gate"), F32, rows + [1])])[0]
    gate16 = em.emit("Cast", [gate], [(em.fresh(f"{node.name}_sink_gate16"), cd, rows + [1])], {"to": cd})[0]
    em.emit("Mul", [y, gate16], [final])


# ---- Attention with soft-capped scores -> standard ops ---------------------------------------
def decomposed(em, node: Node) -> None:
    """out = softmax(mask(c * tanh(q k^T * scale / c))) v in opset-18 ops; scores and softmax in fp32."""
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    sinks = node.inputs[4] if len(node.inputs) > 4 else None
    a = attrs_of(node)
    h, kvh = a["num_heads"], a["kv_heads"]
    qs, ks, vs = dims(q.shape), dims(k.shape), dims(v.shape)
    b, s, skv = qs[0], qs[2], ks[2]
    rows = [b, kvh, None, skv]                 # [B, KV, G*S, Skv]: the group folded into the query rows
    four = [b, h, s, skv]
    cd, n = em.compute, node.name
    i64 = TensorProto.INT64

    def op(kind, ins, elem, shape, attrs=None, note=""):
        return em.emit(kind, ins, [(em.fresh(f"{n}_{kind.lower()}"), elem, shape)], attrs, note=note)[0]

    def scalar(x, base):
        return em.const(np.asarray(x, np.float32), f"{n}_{base}")

    qg = op("Reshape", [em.get(q, cd), em.ints([0, kvh, -1, qs[3]], f"{n}_qg")], cd, [b, kvh, None, qs[3]],
            note="query heads of one kv head as rows: K/V are not repeated")
    kt = op("Transpose", [em.get(k, cd)], cd, [b, kvh, ks[3], skv], {"perm": [0, 1, 3, 2]})
    sc = op("MatMul", [qg, kt], cd, rows)
    sc = op("Reshape", [op("Cast", [sc], F32, rows, {"to": F32}), em.ints([0, h, -1, 0], f"{n}_heads")], F32, four,
            note="scores, mask and softmax in fp32")
    sc = op("Mul", [sc, scalar(a["scale"], "scale")], F32, four)
    c = a["softcap"]
    sc = op("Mul", [op("Tanh", [op("Mul", [sc, scalar(1.0 / c, "inv_cap")], F32, four)], F32, four),
                    scalar(c, "cap")], F32, four, note=f"logit soft-capping: {c:g} * tanh(s / {c:g})")
    ninf = scalar(-np.inf, "ninf")
    if a["causal"] or a["window"]:
        qlen = op("Shape", [em.get(q)], i64, [1], {"start": 2, "end": 3})
        klen = op("Shape", [em.get(k)], i64, [1], {"start": 2, "end": 3})
        zero, one = em.ints(0, f"{n}_zero"), em.ints(1, f"{n}_one")
        i = op("Range", [zero, op("Squeeze", [qlen], i64, []), one], i64, [s])
        j = op("Range", [zero, op("Squeeze", [klen], i64, []), one], i64, [skv])
        pos = op("Add", [op("Unsqueeze", [i, em.ints([1], f"{n}_ax1")], i64, [s, 1]),
                         op("Sub", [klen, qlen], i64, [1])], i64, [s, 1], note="query i sits at i + Skv - S")
        keep = op("LessOrEqual", [j, pos], TensorProto.BOOL, [s, skv]) if a["causal"] else None
        if a["window"]:
            near = op("Greater", [j, op("Sub", [pos, em.ints(a["window"], f"{n}_window")], i64, [s, 1])],
                      TensorProto.BOOL, [s, skv])
            keep = near if keep is None else op("And", [keep, near], TensorProto.BOOL, [s, skv])
        sc = op("Where", [keep, sc, ninf], F32, four)
    if mask is not None and mask.dtype.name == "bool":
        sc = op("Where", [em.get(mask), sc, ninf], F32, four)
    elif mask is not None:
        sc = op("Add", [sc, em.get(mask, F32)], F32, four)
    axes, col = em.ints([-1], f"{n}_last"), [b, h, s, 1]
    m = op("ReduceMax", [sc, axes], F32, col, {"keepdims": 1})
    sink = None
    if sinks is not None:
        sink = op("Reshape", [em.get(sinks, F32), em.ints([1, h, 1, 1], f"{n}_sink_shape")], F32, [1, h, 1, 1])
        m = op("Max", [m, sink], F32, col)
    m = op("Where", [op("Equal", [m, ninf], TensorProto.BOOL, col), scalar(0.0, "zero_f"), m], F32, col,
           note="a query that sees nothing: exp stays 0, the output 0")
    e = op("Exp", [op("Sub", [sc, m], F32, four)], F32, four)
    den = op("ReduceSum", [e, axes], F32, col, {"keepdims": 1})
    if sink is not None:
        den = op("Add", [den, op("Exp", [op("Sub", [sink, m], F32, col)], F32, col)], F32, col,
                 note="attention sinks: one more logit in the denominator")
    p = op("Div", [e, op("Max", [den, scalar(1e-30, "tiny")], F32, col)], F32, four)
    pg = op("Reshape", [op("Cast", [p], cd, four, {"to": cd}), em.ints([0, kvh, -1, 0], f"{n}_pg")], cd, rows)
    y = op("MatMul", [pg, em.get(v, cd)], cd, [b, kvh, None, vs[3]])
    em.emit("Reshape", [y, em.ints([0, h, -1, 0], f"{n}_out_heads")], [em.out(node.outputs[0], cd)])

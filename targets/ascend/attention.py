"""Attention -> CANN FusedInferAttentionScore (BNSD; causal/window as sparse_mode with pre/next_tokens;
sinks through its softmax_lse output: out * sigmoid(lse - sink))."""
from __future__ import annotations

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
    if mask is not None and mask.dtype is not None and mask.dtype.name == "bool" and (causal or window):
        raise L.LimitError(f"node {node.name}: CANN FusedInferAttentionScore takes one atten_mask; a boolean "
                           "mask combined with causal/window masking is not lowered (sparse_mode 0 needs the "
                           "full combined mask)")
    sparse, pre, nxt = sparse_mode(causal, window)
    d = max(dqk, dv) if isinstance(dqk, int) and isinstance(dv, int) else dqk
    facts = {"dtype": em.device_dtype(node, q, L.FIA), "input_layout": "BNSD", "head_dim": d,
             "num_heads": a["num_heads"], "num_key_value_heads": a["kv_heads"], "sparse_mode": sparse,
             "value_head_dim_equals_qk_head_dim": dqk == dv}
    if isinstance(q.shape[0], int):
        facts["batch"] = q.shape[0]
    em.check(node, L.FIA, facts)
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

"""MoE -> MoeGatingTopK (or a polyport kernel: sqrt-softplus scoring, hash routing; or decomposed gating)
-> MoeInitRoutingV2 -> GroupedMatmul (gate|up) -> SwiGlu -> GroupedMatmul (down) -> MoeFinalizeRoutingV2.
Quantized experts: the GroupedMatmuls take the codes and an antiquant scale (quant.py)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ...ir.fused.moe import RENORM_EPS, quantized
from ...ir.graph import Node
from ...ir.ops import attrs_of
from ...ir.symbolic import SymExpr
from . import limits as L
from .emission import CANN_DOMAIN, F32, KERNEL_DOMAIN, dims, lowers, tname
from .mlp import gate_up_weight, gated
from .quant import moe_weights


# ---- MoE -> MoeGatingTopK -> MoeInitRoutingV2 -> GMM -> SwiGlu -> GMM -> MoeFinalizeRoutingV2 ------
@lowers("MoE")
def moe(em, node: Node) -> None:
    x, router_w, e_bias, wg, wu, wd = node.inputs[:6]
    hash_table = node.inputs[6] if len(node.inputs) > 6 else None
    token_ids = node.inputs[7] if len(node.inputs) > 7 else None
    a = attrs_of(node)
    cd = em.compute
    k, scoring = a["top_k"], a["scoring"]
    groups, topk_group = a["n_group"], a["topk_group"]
    e, hdim, inter = wg.shape[0], x.shape[-1], wg.shape[2]
    xs = dims(x.shape)
    t = x.shape[0]
    for dim in x.shape[1:-1]:
        t = dim * t
    rows_t = [str(t) if isinstance(t, SymExpr) else t]
    xn = em.get(x, cd)
    if len(xs) != 2:
        xn = em.emit("Reshape", [xn, em.ints([-1, hdim], f"{node.name}_flat")],
                       [(em.fresh(f"{node.name}_x2d"), cd, rows_t + [hdim])], note="tokens as rows")[0]
    # router: fp32 as DeepSeek-V3/vLLM-Ascend keep it (the gate weight is tiny)
    x32 = em.emit("Cast", [xn], [(em.fresh(f"{node.name}_x_f32"), F32, rows_t + [hdim])], {"to": F32},
                    note="router in fp32")[0]
    logits = em.emit("MatMul", [x32, em.get(router_w, F32)],
                       [(em.fresh(f"{node.name}_router_logits"), F32, rows_t + [e])], note="router")[0]
    renorm, scaling = a["renormalize"], a["routed_scaling"]
    gate_outs = [(em.fresh(f"{node.name}_topk_weights"), F32, rows_t + [k]),
                 (em.fresh(f"{node.name}_topk_ids"), TensorProto.INT32, rows_t + [k])]
    if hash_table is not None:
        em.kernels.add("MoeHashRoutingGate")
        ids = em.get(token_ids)
        if len(token_ids.shape) != 1:
            ids = em.emit("Reshape", [ids, em.ints([-1], f"{node.name}_ids_flat")],
                            [(em.fresh(f"{node.name}_ids"), TensorProto.INT64, rows_t)])[0]
        table = em.const(np.asarray(hash_table.const).astype(np.int32), f"{node.name}_hash_table")
        w, idx = em.emit("MoeHashRoutingGate", [logits, ids, table], gate_outs,
                           {"k": k, "norm_type": scoring, "renorm": renorm,
                            "routed_scaling_factor": scaling, "eps": RENORM_EPS}, KERNEL_DOMAIN,
                           note="CANN has no token->expert table routing: polyport Ascend C kernel")
    elif scoring == "sqrtsoftplus":
        em.kernels.add("MoeGatingTopKSqrtSoftplus")
        w, idx = em.emit("MoeGatingTopKSqrtSoftplus", [logits, em.get(e_bias, F32)], gate_outs,
                           {"k": k, "k_group": topk_group, "group_count": groups, "group_select_mode": 1,
                            "renorm": renorm, "routed_scaling_factor": scaling, "eps": RENORM_EPS}, KERNEL_DOMAIN,
                           note="MoeGatingTopK has norm_type softmax/sigmoid only: polyport Ascend C kernel")
    else:
        facts = {"dtype": "float32", "expert_count": e, "k": k, "group_count": groups, "norm_type": scoring}
        if groups > 1:
            facts["experts_per_group"] = e // groups
        broken = [lim.name for lim in L.LIMITS[L.GATING] if lim.name in facts and not lim.ok(facts[lim.name])
                  and lim.fallback is not None]
        if broken and groups > 1:
            lim = next(l for l in L.LIMITS[L.GATING] if l.name == broken[0])
            raise L.LimitError(f"node {node.name}: CANN {L.GATING} requires {lim.describe()}, got "
                               f"{facts[lim.name]!r} ({lim.source}); the decomposed fallback does not do "
                               f"group-limited selection (n_group={groups})")
        if em.check(node, L.GATING, facts):
            w, idx = decomposed_gating(em, node, logits, e_bias, rows_t, e, k, scoring, renorm, scaling)
        else:
            w, idx = em.emit("MoeGatingTopK", [logits, em.get(e_bias, F32)], gate_outs,
                               {"k": k, "k_group": topk_group, "group_count": groups, "group_select_mode": 1,
                                "renorm": renorm, "norm_type": 0 if scoring == "softmax" else 1,
                                "out_flag": 0, "routed_scaling_factor": scaling, "eps": RENORM_EPS}, CANN_DOMAIN)
    em.check(node, "MoeInitRoutingV2", {"expert_count": e, "dtype": tname(cd)})
    tk = t * k
    rows_tk = [str(tk) if isinstance(tk, SymExpr) else tk]
    ex, row_idx, counts = em.emit(
        "MoeInitRoutingV2", [xn, idx],
        [(em.fresh(f"{node.name}_expanded_x"), cd, rows_tk + [hdim]),
         (em.fresh(f"{node.name}_expanded_row_idx"), TensorProto.INT32, rows_tk),
         (em.fresh(f"{node.name}_expert_tokens_cumsum"), TensorProto.INT64, [e])],
        {"active_num": 0, "expert_capacity": 0, "expert_num": int(e), "drop_pad_mode": 0,
         "expert_tokens_count_or_cumsum_flag": 1, "expert_tokens_before_capacity_flag": 0}, CANN_DOMAIN)
    em.check(node, "GroupedMatmul", {"group_count": e, "dtype": tname(cd), "k_dim": hdim, "n_dim": 2 * inter})
    gmm_attrs = {"split_item": 3, "group_type": 0, "group_list_type": 0, "act_type": 0}
    if quantized(node):      # codes + antiquantScaleOptional (quant.py), or dequantized where CANN can't
        (w_gu, s_gu), (w_d, s_d) = moe_weights(em, node, (3, 4), True), moe_weights(em, node, (5,), False)
        gu_ins = [ex, w_gu, counts] + ([s_gu] if s_gu else [])
    else:
        w_gu, w_d, s_d = gate_up_weight(em, node, wg, wu, -1), em.get(wd, cd), None
        gu_ins = [ex, w_gu, counts]
    h = em.emit("GroupedMatmul", gu_ins,
                  [(em.fresh(f"{node.name}_gate_up"), cd, rows_tk + [2 * inter])], gmm_attrs, CANN_DOMAIN,
                  note="gate|up of every expert: weights [E, H, 2I]")[0]
    act = gated(em, node, h, rows_tk, inter, a["activation"], a["clamp"])
    down = em.emit("GroupedMatmul", [act, w_d, counts] + ([s_d] if s_d else []),
                     [(em.fresh(f"{node.name}_down"), cd, rows_tk + [hdim])], gmm_attrs, CANN_DOMAIN,
                     note="down of every expert: weights [E, I, H]")[0]
    scales = em.emit("Cast", [w], [(em.fresh(f"{node.name}_scales"), cd, rows_t + [k])], {"to": cd})[0]
    final = em.out(node.outputs[0], cd)
    fin_out = final if len(xs) == 2 else (em.fresh(f"{node.name}_y2d"), cd, rows_t + [hdim])
    y = em.emit("MoeFinalizeRoutingV2", [down, row_idx, "", "", "", scales, idx], [fin_out],
                  {"drop_pad_mode": 0}, CANN_DOMAIN)[0]
    if len(xs) != 2:
        shp = em.emit("Shape", [em.get(x, cd)], [(em.fresh(f"{node.name}_xshape"), TensorProto.INT64,
                                                     [len(xs)])])[0]
        em.emit("Reshape", [y, shp], [final])


def decomposed_gating(em, node, logits, e_bias, rows, e, k, scoring, renorm, scaling):
    sh = rows + [e]
    scores = em.emit("Softmax" if scoring == "softmax" else "Sigmoid", [logits],
                       [(em.fresh(f"{node.name}_scores"), F32, sh)], {"axis": -1} if scoring == "softmax" else {},
                       note="decomposed gating (fallback)")[0]
    choice = scores
    if e_bias is not None:
        choice = em.emit("Add", [scores, em.get(e_bias, F32)], [(em.fresh(f"{node.name}_choice"), F32, sh)])[0]
    _, idx64 = em.emit("TopK", [choice, em.ints([k], f"{node.name}_k")],
                         [(em.fresh(f"{node.name}_topv"), F32, rows + [k]),
                          (em.fresh(f"{node.name}_topi"), TensorProto.INT64, rows + [k])], {"axis": 1})
    w = em.emit("GatherElements", [scores, idx64], [(em.fresh(f"{node.name}_w"), F32, rows + [k])],
                  {"axis": 1})[0]
    if renorm:
        s = em.emit("ReduceSum", [w, em.ints([-1], f"{node.name}_ax")],
                      [(em.fresh(f"{node.name}_wsum"), F32, rows + [1])], {"keepdims": 1})[0]
        s = em.emit("Add", [s, em.const(np.asarray(RENORM_EPS, np.float32), f"{node.name}_eps")],
                      [(em.fresh(f"{node.name}_wsum_eps"), F32, rows + [1])])[0]
        w = em.emit("Div", [w, s], [(em.fresh(f"{node.name}_wn"), F32, rows + [k])])[0]
    w = em.emit("Mul", [w, em.const(np.asarray(scaling, np.float32), f"{node.name}_scaling")],
                  [(em.fresh(f"{node.name}_topk_weights"), F32, rows + [k])])[0]
    idx = em.emit("Cast", [idx64], [(em.fresh(f"{node.name}_topk_ids"), TensorProto.INT32, rows + [k])],
                    {"to": TensorProto.INT32})[0]
    return w, idx

"""CacheUpdate -> ScatterPaKvCache (or ScatterND), CachedAttention -> FusedInferAttentionScore over paged caches.

Write, then read, as vLLM-Ascend orders them (attention_v1.py: `_npu_reshape_and_cache` before
`npu_fused_infer_attention_score`): a CachedAttention node emits its layer's cache writes first (the
derived program reads the cache before its CacheUpdate; over the updated cache FIA sees the new rows
through actual_seq_lengths_kv = past_len + step, with the same causal band).

- K and V caches (mha, window): one ScatterPaKvCache (aclnnScatterPaKvCache, "Norm" mode: key/value
  [tokens, kv_heads, head_dim], caches [num_blocks, block_size, kv_heads, head_dim], slotMapping [tokens];
  ops-transformer attention/scatter_pa_kv_cache/README.md, CANN 8.3 aclnn reference), the operator behind
  torch_npu's npu_scatter_pa_kv_cache / vLLM-Ascend's reshape_and_cache.
- MLA: the same operator with key = the normalised latent and value = the rotated rope key into the
  `.nope` / `.rope` caches (vLLM-Ascend mla_v1.py: `_npu_reshape_and_cache(key=kv_c_normed, value=k_pe,
  key_cache=kv_cache[0], value_cache=kv_cache[1])`; ScatterPaKvCache's "Norm" mode lets k_head_size and
  v_head_size differ). CANN's fused KvRmsNormRopeCache (RMSNorm + RoPE + scatter,
  torch_npu.npu_kv_rmsnorm_rope_cache) is not used: the CANN 8.3 and 9.0 aclnn pages
  (aclnnKvRmsNormRopeCache) list it for neither Atlas A2 nor A3 (Atlas 350 only), and torch_npu documents
  it for kv of 576 = 512 (RMSNorm) + 64 (RoPE) only; the chain stays RmsNorm -> RotaryPositionEmbedding ->
  ScatterPaKvCache. The MLA prologue (MlaProlog) is not planned: it fuses the
  query/latent projections at DeepSeek-V3's sizes (hidden 7168, q_lora 1536) only.
- One shared K=V cache (DeepSeek V4): ONNX ScatterND over the cache viewed as [slots, kv_heads, dim] (ATC
  maps it to ScatterNdUpdate, the operator behind torch_npu.npu_scatter_nd_update_).
- Decode attention: FusedInferAttentionScore (aclnnFusedInferAttentionScoreV2) with the paged caches viewed
  [num_blocks, block_size, kv_heads * dim], blockTable, blockSize and actualSeqLengthsKv (the signature of the
  CANN 8.x aclnn reference; vLLM-Ascend calls it the same way for decode, BNSD query + paged BSH caches,
  `pre_tokens=sliding_window` for windows). MLA decodes absorbed: query = the absorbed latent query, key =
  value = the latent cache, query_rope / key_rope = the rope parts (vLLM-Ascend mla_v1 / torchair_mla;
  queryRopeOptional / keyRopeOptional are inputs of aclnnFusedInferAttentionScoreV3), when the dims are
  DeepSeek's 512 + 64; other dims fall back to one [latent ; rope] key (limits.py).
"""
from __future__ import annotations

from onnx import TensorProto

from ...errors import PolyportError
from ...ir.graph import Node, Value
from ...ir.ops import attrs_of
from ...ir.symbolic import SymExpr
from . import limits as L
from .attention import compressed_mask, sink_gate, sparse_mode
from .emission import CANN_DOMAIN, F32, dims, lowers, tname


def _paged(em, node: Node):
    if em.paged is None:
        raise PolyportError(f"ascend: node {node.name} ({node.qualified_op}) is only lowered inside a derived "
                            "prefill/decode program")
    return em.paged


def _text(d):
    return str(d) if isinstance(d, SymExpr) else d


def _rows(em, node: Node, v: Value, tag: str) -> str:
    """New rows [B, KVH, S, D] as tokens [B * S, KVH, D] (what the cache writes take)."""
    b, kvh, s, d = v.shape
    cd = em.compute
    t = em.emit("Transpose", [em.get(v, cd)], [(em.fresh(f"{node.name}_{tag}_bshd"), cd, dims((b, s, kvh, d)))],
                {"perm": [0, 2, 1, 3]}, note="new rows token-major")[0]
    return em.emit("Reshape", [t, em.ints([-1, kvh, d], f"{node.name}_{tag}_tokens")],
                   [(em.fresh(f"{node.name}_{tag}_rows"), cd, [_text(b * s), kvh, d])])[0]


@lowers("CacheUpdate")
def cache_update(em, node: Node) -> None:
    _paged(em, node)
    write_layer(em, node.inputs[0].name)


def write_layer(em, tensor: str) -> None:
    """Emit the paged write of `tensor`'s layer (both of its CacheUpdates when it has K and V caches)."""
    paged = em.paged
    layer = paged.layer[tensor]
    updates = [paged.updates[t] for t in layer.tensors]
    node = updates[0]
    em.done.update(updates)
    em.current = node
    cd = em.compute
    group = paged.group(tensor)
    slots = f"slot_mapping.{group}"
    em.check(node, "ScatterPaKvCache", {"dtype": tname(cd), "cache_mode": "Norm"})
    if layer.kind == "mla":
        nope, rope = paged.inputs[tensor]
        rows = _rows(em, node, node.inputs[1], "keys")
        dc, dr = layer.v_head_dim, layer.head_dim - layer.v_head_dim
        tokens = em.shape[rows][0]
        latent, k_rope = em.emit("Split", [rows, em.ints([dc, dr], f"{node.name}_split")],
                                 [(em.fresh(f"{node.name}_latent"), cd, [tokens, 1, dc]),
                                  (em.fresh(f"{node.name}_k_rope"), cd, [tokens, 1, dr])], {"axis": -1},
                                 note="MLA cache row: normalised latent | rotated rope key")
        outs = [(f"{nope}.out", cd, em.shape[nope]), (f"{rope}.out", cd, em.shape[rope])]
        paged.written[tensor] = em.emit("ScatterPaKvCache", [latent, nope, slots, k_rope, rope], outs,
                                        {"cache_mode": "Norm"}, CANN_DOMAIN,
                                        note="MLA latent cache: key = latent -> .nope, value = rope key -> .rope")
        return
    if len(updates) == 2:
        k_in, v_in = paged.inputs[layer.tensors[0]][0], paged.inputs[layer.tensors[1]][0]
        k_rows, v_rows = _rows(em, node, updates[0].inputs[1], "k"), _rows(em, node, updates[1].inputs[1], "v")
        k_out, v_out = em.emit("ScatterPaKvCache", [k_rows, k_in, slots, v_rows, v_in],
                               [(f"{k_in}.out", cd, em.shape[k_in]), (f"{v_in}.out", cd, em.shape[v_in])],
                               {"cache_mode": "Norm"}, CANN_DOMAIN)
        paged.written[layer.tensors[0]], paged.written[layer.tensors[1]] = [k_out], [v_out]
        return
    cache = paged.inputs[tensor][0]
    shape = em.shape[cache]
    rows = _rows(em, node, node.inputs[1], "kv")
    flat = em.emit("Reshape", [cache, em.ints([-1] + shape[2:], f"{node.name}_slots")],
                   [(em.fresh(f"{node.name}_cache_slots"), cd, [None] + shape[2:])], note="cache as slots")[0]
    idx = em.emit("Cast", [slots], [(em.fresh(f"{node.name}_slot64"), TensorProto.INT64, ["tokens"])],
                  {"to": TensorProto.INT64})[0]
    idx = em.emit("Unsqueeze", [idx, em.ints([-1], f"{node.name}_idx_axis")],
                  [(em.fresh(f"{node.name}_slot_idx"), TensorProto.INT64, ["tokens", 1])])[0]
    written = em.emit("ScatterND", [flat, idx, rows], [(em.fresh(f"{node.name}_written"), cd, [None] + shape[2:])],
                      note="one shared K=V cache: ScatterNdUpdate at the slots")[0]
    paged.written[tensor] = em.emit("Reshape", [written, em.ints([-1] + shape[1:], f"{node.name}_paged")],
                                    [(f"{cache}.out", cd, shape)])


@lowers("CachedAttention")
def cached_attention(em, node: Node) -> None:
    q, k_new, v_new, cache_k, cache_v, past = node.inputs[:6]
    sinks = node.inputs[6] if len(node.inputs) > 6 else None
    paged = _paged(em, node)
    for tensor in dict.fromkeys((cache_k.name, cache_v.name)):
        if tensor not in paged.written:
            write_layer(em, tensor)
    em.current = node
    a = attrs_of(node)
    cd = em.compute
    layer = paged.layer[cache_k.name]
    group = paged.group(cache_k.name)
    bs = paged.block_size
    nh, kvh = a["num_heads"], a["kv_heads"]
    dqk, dv = q.shape[3], v_new.shape[3]
    qs = dims(q.shape)
    if paged.kv_lengths is None:      # every layer of a step sees past_len + step keys
        n_new = paged.updates[cache_k.name].inputs[3]
        paged.kv_lengths = em.emit("Add", [em.get(past), em.get(n_new)],
                                   [(em.fresh("actual_seq_lengths_kv"), TensorProto.INT64, dims(past.shape))],
                                   note="FIA actualSeqLengthsKv: cached + new tokens per sequence")[0]

    def flat(name: str, width: int) -> str:
        """A paged cache [num_blocks, block_size, kv_heads, dim] as FIA's [num_blocks, block_size, H] (a view)."""
        return em.emit("Reshape", [name, em.ints([0, 0, -1], f"{node.name}_bsh")],
                       [(em.fresh(f"{name}_bsh"), cd, em.shape[name][:2] + [width])])[0]

    def sliced(val: str, lo: int, hi: int, tag: str) -> str:
        return em.emit("Slice", [val, em.ints([lo], f"{node.name}_{tag}0"), em.ints([hi], f"{node.name}_{tag}1"),
                                 em.ints([-1], f"{node.name}_{tag}ax")],
                       [(em.fresh(f"{node.name}_{tag}"), cd, qs[:-1] + [hi - lo])])[0]

    query, query_rope, key_rope = em.get(q, cd), "", ""
    facts = {"dtype": em.device_dtype(node, q, L.FIA), "input_layout": "BNSD", "num_heads": nh,
             "num_key_value_heads": kvh, "kv_heads_ratio": nh // kvh, "block_size": bs}
    if isinstance(q.shape[0], int):
        facts["batch"] = q.shape[0]
    if layer.kind == "mla":
        nope, rope = paged.written[cache_k.name]
        dc, dr = layer.v_head_dim, layer.head_dim - layer.v_head_dim
        if em.check(node, L.FIA, {**facts, "head_dim": dc, "mla_dims": (dc, dr)}):
            both = em.emit("Concat", [nope, rope], [(em.fresh(f"{node.name}_latent_rope"), cd,
                                                     em.shape[nope][:3] + [dc + dr])], {"axis": -1},
                           note="MLA fallback: one [latent ; rope] key per token")[0]
            key = value = flat(both, dc + dr)
            d_out = dc + dr
            em.check(node, L.FIA, {"head_dim": dc + dr})
        else:
            query, query_rope = sliced(query, 0, dc, "q_latent"), sliced(query, dc, dqk, "q_rope")
            key = value = flat(nope, dc)
            key_rope = flat(rope, dr)
            d_out = dc
    else:
        if not a["v_in_k"] and dqk != dv:
            raise L.LimitError(f"node {node.name}: CANN FusedInferAttentionScore over paged caches needs equal key "
                               f"and value head dims, got {dqk} and {dv} ({L.FIA_SRC}; {L.DOCS})")
        em.check(node, L.FIA, {**facts, "head_dim": dqk})
        k_out = paged.written[cache_k.name][0]
        key = flat(k_out, kvh * dqk)
        value = key if a["v_in_k"] else flat(paged.written[cache_v.name][0], kvh * dv)
        d_out = dqk
    sparse, pre, nxt = sparse_mode(True, a["window"])
    ins = [query, key, value, "", compressed_mask(em, node), "", paged.kv_lengths, f"block_table.{group}",
           query_rope, key_rope]
    while not ins[-1]:
        ins.pop()
    outs = [(em.fresh(f"{node.name}_fia_out"), cd, qs[:-1] + [d_out])]
    if sinks is not None:
        outs.append((em.fresh(f"{node.name}_softmax_lse"), F32, qs[:-1] + [1]))
    res = em.emit("FusedInferAttentionScore", ins, outs,
                  {"num_heads": int(nh), "num_key_value_heads": int(kvh if layer.kind != "mla" else 1),
                   "scale": float(a["scale"]), "input_layout": "BNSD", "sparse_mode": sparse,
                   "pre_tokens": pre, "next_tokens": nxt, "inner_precise": 0, "block_size": bs,
                   "softmax_lse_flag": int(sinks is not None)}, CANN_DOMAIN,
                  note="decode attention over the paged caches (block_table, actual_seq_lengths_kv)")
    if query_rope:
        em.plan[-1]["aclnn"] = "aclnnFusedInferAttentionScoreV3"      # queryRope / keyRope are V3's inputs
    final = em.out(node.outputs[0], cd)
    y = res[0]
    if d_out != dv:
        target = (em.fresh(f"{node.name}_sliced"), cd, qs[:-1] + [dv]) if sinks is not None else final
        y = em.emit("Slice", [y, em.ints([0], f"{node.name}_o0"), em.ints([dv], f"{node.name}_o1"),
                              em.ints([-1], f"{node.name}_oax")], [target],
                    note=f"the values are the first {dv} key channels")[0]
    if sinks is not None:
        sink_gate(em, node, y, res[1], sinks, qs[:-1], final)
    elif d_out == dv:
        em.nodes[-1].output[0] = final[0]           # FIA's output is the node's output
        em.plan[-1]["outputs"][0]["name"] = final[0]
        em.elem[final[0]], em.shape[final[0]] = cd, final[2]

"""polyport's fused ops, per kernel set: "cpu" (hand-written, scheduled kernels in kernels/cpu/) and
"portable" (TE computes in kernels/portable/ that the GPU targets schedule; RMSNorm, Rotary and
GatedMLP share the TE computes of kernels/cpu/ in both sets). Meaning: ir/fused/."""
from __future__ import annotations

import dataclasses

import numpy as np

from ...ir.fused.moe import MOE_INPUTS, RENORM_EPS
from ...ir.fused.moe import SCALES as MOE_SCALES
from ...ir.ops import attrs_of
from . import FLOAT_BF, lowers
from .dense import flatten2d, packed_gemm


@lowers("polyport::RMSNorm", dtypes=FLOAT_BF, kernels=("portable",))
def rms_norm(lw, node):
    from ..kernels.cpu import norm
    x, w = (lw.get(v) for v in node.inputs)
    return lw.bb.emit_te(norm.rms_norm, x, w, float(node.attrs["epsilon"]), primfunc_name_hint="rms_norm")


@lowers("polyport::RMSNorm", dtypes=FLOAT_BF, kernels=("cpu",))
def rms_norm_cpu(lw, node):
    """The vectorised row kernel where the width is whole vectors (and the weight has x's dtype), else TE's."""
    from ..kernels.cpu import norm
    x, w = (lw.get(v) for v in node.inputs)
    n = lw.as_int(lw.shape(x)[-1])
    if n is None or not norm.vectorizes(n) or w.ty.dtype != x.ty.dtype:
        return rms_norm(lw, node)
    x2, shape = flatten2d(lw, x)
    func = norm.rms_norm_func(n, float(node.attrs["epsilon"]), x.ty.dtype)
    gv = lw.add_kernel(func, "rms_norm")
    y = lw.emit(lw.relax.call_tir(gv, [x2, w], lw.relax.TensorType(shape=lw.shape(x2), dtype=x.ty.dtype)))
    return lw.emit(lw.relax.op.reshape(y, shape)) if len(shape) != 2 else y


@lowers("polyport::Rotary", dtypes=FLOAT_BF)
def rotary(lw, node):
    from ..kernels.cpu import rotary
    x, c, s = (lw.get(v) for v in node.inputs)
    a = attrs_of(node)
    return lw.bb.emit_te(rotary.rotary, x, c, s, a["rotary_dim"], bool(a["interleaved"]),
                           primfunc_name_hint="rotary")


@lowers("polyport::GatedMLP", dtypes=FLOAT_BF)
def gated_mlp(lw, node):
    from ..kernels.cpu import mlp
    x, wg, wu, wd = (lw.get(v) for v in node.inputs[:4])
    x2, shape = flatten2d(lw, x)
    a = attrs_of(node)
    act, clamp = a["activation"], a["clamp"]
    names = [v.name for v in node.inputs[1:4]]
    if a["bits"]:                # quantized: three dequantize-in-register GEMMs, the activation between
        y = _quantized_gated_mlp(lw, node, x2, a, packed=all(n in lw.packed for n in names))
        out_shape = shape[:-1] + [lw.shape(y)[1]]
    elif all(n in lw.packed for n in names):
        h = packed_gemm(lw, x2, [wg, wu], "gated_mlp_gate_up_packed", act=act, clamp=clamp)
        y = packed_gemm(lw, h, [wd], "gated_mlp_down_packed")
        out_shape = shape[:-1] + [lw.simplify(lw.shape(wd)[0] * lw.shape(wd)[2])]
    else:
        h = lw.bb.emit_te(mlp.gate_up, x2, wg, wu, act, clamp, primfunc_name_hint="gated_mlp_gate_up")
        y = lw.bb.emit_te(mlp.matmul, h, wd, primfunc_name_hint="gated_mlp_down")
        out_shape = shape[:-1] + [lw.shape(wd)[-1]]
    return lw.emit(lw.relax.op.reshape(y, out_shape)) if len(shape) != 2 else y


def _quantized_gated_mlp(lw, node, x2, a, *, packed: bool):
    from tvm import te

    from ..kernels.cpu.mlp import activation, clamp_up
    from .quant import quant_dense
    per_byte = 2 if a["bits"] == 4 else 1
    q = dict(bits=a["bits"], block_size=a["block_size"], format=a["format"])
    codes = [node.inputs[i] for i in (1, 2, 3)]
    dims = [dict(K=c.const.shape[0] * per_byte, N=c.const.shape[1], **q) for c in codes]
    g, u = (quant_dense(lw, x2, lw.get(c), lw.get(node.inputs[i + 3]), None, None, d, packed=packed, k_major=True)
            for c, d, i in zip(codes[:2], dims[:2], (1, 2)))

    def gate(g, u):
        return te.compute(g.shape, lambda i, j: (activation(a["activation"], g[i, j].astype("float32"), a["clamp"])
                                                 * clamp_up(u[i, j].astype("float32"), a["clamp"])).astype(g.dtype),
                          name="gated")

    h = lw.bb.emit_te(gate, g, u, primfunc_name_hint="gated_mlp_act")
    return quant_dense(lw, h, lw.get(codes[2]), lw.get(node.inputs[6]), None, None, dims[2], packed=packed,
                       k_major=True)


def _attention_operands(lw, node):
    """q, k, v, mask (or None), sinks (or None)."""
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    return [None if v is None else lw.get(v) for v in ins[:5]]


@lowers("polyport::Attention", dtypes=FLOAT_BF, kernels=("portable",))
def attention_portable(lw, node):
    """Causal, unmasked self-attention without a soft-cap (prefill, the cache-less forward): the streaming
    online-softmax kernel with one split (lowering/cache.py); anything else: the TE compute (whole score
    rows, three reductions) for a target's own schedule."""
    from ..kernels.portable import attention
    from .cache import streamed_attention
    q, k, v, mask, sinks = _attention_operands(lw, node)
    a = attrs_of(node)
    if a["causal"] and mask is None and not a["softcap"] \
            and lw.analyzer.can_prove_equal(lw.shape(q)[2], lw.shape(k)[2]):
        past = lw.emit(lw.relax.op.zeros(lw.relax.ShapeExpr([lw.shape(q)[0]]), "int64"))     # no cache: k, v unread
        return streamed_attention(lw, node, q, k, v, k, v, past, sinks, window=a["window"], ring=False,
                                  v_in_k=False, max_splits=1)
    kw = dict(num_heads=a["num_heads"], kv_heads=a["kv_heads"], scale=a["scale"],
              causal=bool(a["causal"]), window=a["window"], softcap=a["softcap"])

    def fn(q, k, v, *rest):
        it = iter(rest)
        m = next(it) if mask is not None else None
        s = next(it) if sinks is not None else None
        return attention.attention(q, k, v, m, s, **kw)

    return lw.bb.emit_te(fn, *[x for x in (q, k, v, mask, sinks) if x is not None],
                           primfunc_name_hint="attention")


@lowers("polyport::Attention", dtypes=FLOAT_BF, kernels=("cpu",))
def attention_cpu(lw, node):
    """One call_tir into the hand-scheduled cpu kernel (visible key blocks only, online softmax)."""
    from ..kernels.cpu import attention
    q, k, v, mask, sinks = _attention_operands(lw, node)
    relax = lw.relax
    qs, vs = lw.shape(q), lw.shape(v)
    d, dv = lw.as_int(qs[3]), lw.as_int(vs[3])
    if d is None or dv is None:
        raise lw.unsupported(node, "head dims must be static")
    a = attrs_of(node)
    func = attention.attention_func(
        num_heads=a["num_heads"], kv_heads=a["kv_heads"], d=d, dv=dv, scale=a["scale"],
        causal=bool(a["causal"]), window=a["window"],
        mask_shape=None if mask is None else [lw.as_int(x) for x in lw.shape(mask)],
        mask_dtype="float32" if mask is None else mask.ty.dtype, sinks=sinks is not None,
        sinks_dtype="float32" if sinks is None else sinks.ty.dtype, dtype=q.ty.dtype, softcap=a["softcap"])
    gv = lw.add_kernel(func, "attention")
    placeholder = relax.const(np.zeros(1, np.float32))                   # absent mask / sinks
    args = [q, k, v, placeholder if mask is None else mask, placeholder if sinks is None else sinks]
    out = relax.TensorType(shape=qs[:3] + [vs[3]], dtype=q.ty.dtype)
    return lw.emit(relax.call_tir(gv, args, out))


@lowers("polyport::MoE", dtypes=FLOAT_BF, kernels=("cpu",))
def moe_cpu(lw, node):
    """One call_tir into the fused cpu MoE kernel (routing, expert grouping, GEMMs, combine)."""
    from ..kernels.cpu import moe
    relax = lw.relax
    ins = list(node.inputs) + [None] * (len(MOE_INPUTS) - len(node.inputs))
    x, router_w, e_bias, wg, wu, wd, hash_table, token_ids, _, _, _, router_b, b_gate, b_up, b_down = ins
    a = attrs_of(node)
    x2, shape = flatten2d(lw, lw.get(x))
    H, E = (lw.as_int(d) for d in lw.shape(lw.get(router_w)))
    nb = lw.packed.get(wg.name, 0)           # codes and scales bound column-blocked (lowering/quant.py)

    def expert_dims(w):
        """(E, K stored, N) of expert weights as bound: [E, K, N], or column-blocked [E, N / nb, K, nb]."""
        d = [lw.as_int(x) for x in lw.shape(lw.get(w))]
        return (d[0], d[2], None if d[1] is None else d[1] * nb) if nb else tuple(d)

    Ew, Hw, I = expert_dims(wg)
    per_byte = 2 if a["bits"] == 4 else 1
    Hw = None if Hw is None else Hw * per_byte
    Ho = expert_dims(wd)[2]
    if None in (H, E, I, Ho) or (Ew, Hw) != (E, H):
        raise lw.unsupported(node, "expert and router weights need static, matching shapes")
    groups = a["n_group"]
    if groups > 1 and E % groups:
        raise lw.unsupported(node, f"{E} experts do not split into {groups} groups")
    if a["bits"] and lw.get(router_w).ty.dtype != "float32":
        raise lw.unsupported(node, f"a {lw.get(router_w).ty.dtype} router with quantized experts (takes f32)")
    spec = moe.MoeSpec(
        hidden=H, experts=E, top_k=a["top_k"], inter=I, out=Ho, scoring=a["scoring"],
        n_group=groups, topk_group=a["topk_group"], renormalize=bool(a["renormalize"]),
        scaling=a["routed_scaling"], act=a["activation"], clamp=a["clamp"], alpha=a["alpha"],
        up_offset=a["up_offset"], router_bias=router_b is not None, routing=a["routing"], jitter_eps=a["jitter_eps"],
        biases=any(b is not None for b in (b_gate, b_up, b_down)), x_dtype=x2.ty.dtype, w_dtype=lw.get(wg).ty.dtype,
        bits=a["bits"], block=a["block_size"], fmt=a["format"], column_block=nb)
    if spec.scoring not in moe.SCORINGS:
        raise lw.unsupported(node, f"scoring {spec.scoring!r}")
    if hash_table is not None:
        table = lw.get(hash_table)
        spec = dataclasses.replace(spec, hash_vocab=lw.as_int(lw.shape(table)[0]), table_dtype=table.ty.dtype)
        tid = lw.emit(relax.op.reshape(lw.get(token_ids), [-1]))
        if tid.ty.dtype != "int64":
            tid = lw.emit(relax.op.astype(tid, "int64"))
        args = [x2, lw.get(router_w), table, tid]
    else:
        bias = lw.get(e_bias) if e_bias is not None else relax.const(np.zeros(E, np.float32))  # + 0: exact
        if bias.ty.dtype != "float32":
            bias = lw.emit(relax.op.astype(bias, "float32"))
        args = [x2, lw.get(router_w), bias]
    none = relax.const(np.zeros(1, np.float32))
    scales = [lw.get(ins[i]) if a["bits"] else none for i in MOE_SCALES]
    gv = lw.add_kernel(moe.moe_func(spec), "moe")
    biases = [_f32_or_zeros(lw, router_b, (1,))] + \
        [_f32_or_zeros(lw, b, shp if spec.biases else (1,)) for b, shp in ((b_gate, (E, I)), (b_up, (E, I)),
                                                                             (b_down, (E, Ho)))]
    y = lw.emit(relax.call_tir(gv, relax.Tuple(args + [lw.get(wg), lw.get(wu), lw.get(wd)] + biases + scales),
                                 relax.TensorType([lw.shape(x2)[0], Ho], x2.ty.dtype)))
    return lw.emit(relax.op.reshape(y, shape[:-1] + [Ho])) if len(shape) != 2 else y


def _sparsemixer(lw, z, jitter_eps: float):
    """PhiMoE's two picks as Relax ops (ir/fused/moe.py `sparsemixer`): each pick the argmax of the logits
    left, its weight 1 / sum exp(z - max) over the logits left within the band (max - z) <= 2 eps
    max(|z|, max)."""
    relax = lw.relax
    op = relax.op
    E = lw.as_int(lw.shape(z)[1])
    experts = relax.const(np.arange(E, dtype=np.int64))
    ninf, zero = relax.const(float("-inf"), "float32"), relax.const(0.0, "float32")
    left, picks, weights = z, [], []
    for _ in range(2):
        i = lw.emit(op.argmax(left, -1, keepdims=True))
        m = lw.emit(op.max(left, [-1], keepdims=True))
        band = op.less_equal(op.subtract(m, z), op.multiply(relax.const(2 * jitter_eps, "float32"),
                                                            op.maximum(op.abs(z), m)))
        den = lw.emit(op.sum(op.where(band, op.exp(op.subtract(left, m)), zero), [-1], keepdims=True))
        picks.append(i)
        weights.append(lw.emit(op.divide(relax.const(1.0, "float32"), den)))
        left = lw.emit(op.where(op.equal(experts, i), ninf, left))
    return lw.emit(op.concat(picks, -1)), lw.emit(op.concat(weights, -1))


def _f32_or_zeros(lw, v, shape):
    """Operand `v` as f32, or zeros of `shape` where the node has none (a bias the kernel adds as 0)."""
    if v is None:
        return lw.relax.const(np.zeros(shape, np.float32))
    x = lw.get(v)
    return x if x.ty.dtype == "float32" else lw.emit(lw.relax.op.astype(x, "float32"))


@lowers("polyport::MoE", dtypes=FLOAT_BF, kernels=("portable",))
def moe_portable(lw, node):
    """Routing as Relax ops, then the TE expert compute (only the chosen experts, weights read in place);
    in the decode program, the few-token GEMV kernels (kernels/portable/moe_gemv.py) instead."""
    from ..kernels.portable import moe
    relax = lw.relax
    op = relax.op
    ins = list(node.inputs) + [None] * (len(MOE_INPUTS) - len(node.inputs))
    x, router_w, e_bias, wg, wu, wd, hash_table, token_ids, _, _, _, router_b, b_gate, b_up, b_down = ins
    a = attrs_of(node)
    x2, shape = flatten2d(lw, lw.get(x))
    x2f = x2 if x2.ty.dtype == "float32" else lw.emit(op.astype(x2, "float32"))
    logits = lw.emit(op.matmul(x2f, lw.get(router_w)))
    if router_b is not None:
        logits = lw.emit(op.add(logits, _f32_or_zeros(lw, router_b, None)))
    scoring = a["scoring"]
    if scoring == "softmax":
        scores = lw.emit(op.nn.softmax(logits, -1))
    elif scoring == "sigmoid":
        scores = lw.emit(op.sigmoid(logits))
    elif scoring == "sqrtsoftplus":
        big = relax.const(20.0, "float32")
        sp = lw.emit(op.where(op.greater(logits, big), logits,
                                op.log(op.add(op.exp(op.minimum(logits, big)), relax.const(1.0, "float32")))))
        scores = lw.emit(op.sqrt(sp))
    else:
        raise lw.unsupported(node, f"scoring {scoring!r}")
    if a["routing"] == "sparsemixer":
        idx, w = _sparsemixer(lw, logits, a["jitter_eps"])
    elif hash_table is not None:
        table = lw.get(hash_table)
        tid = lw.emit(op.astype(op.reshape(lw.get(token_ids), [-1]), "int64"))
        idx = lw.emit(op.astype(op.take(table, tid, axis=0), "int64"))
    else:
        choice = scores if e_bias is None else lw.emit(op.add(scores, lw.get(e_bias)))
        groups = a["n_group"]
        if groups > 1:
            E = lw.as_int(lw.shape(choice)[1])
            T = lw.shape(choice)[0]
            per = lw.emit(op.reshape(choice, [T, groups, E // groups]))
            gscore = lw.emit(op.sum(op.topk(per, 2, -1, "values", True), [-1]))
            kept = lw.emit(op.topk(gscore, a["topk_group"], -1, "values", True))
            gmask = lw.emit(op.greater_equal(gscore, op.min(kept, [-1], keepdims=True)))   # [T, G]
            gmask = lw.emit(op.reshape(op.broadcast_to(op.expand_dims(gmask, 2), [T, groups, E // groups]),
                                         [T, E]))
            choice = lw.emit(op.where(gmask, choice, relax.const(float("-inf"), "float32")))
        idx = lw.emit(op.topk(choice, a["top_k"], -1, "indices", True, "int64"))
    if a["routing"] != "sparsemixer":
        w = lw.emit(op.gather_elements(scores, idx, 1))
    if a["renormalize"]:
        w = lw.emit(op.divide(w, op.add(op.sum(w, [-1], keepdims=True), relax.const(RENORM_EPS, "float32"))))
    scale = a["routed_scaling"]
    if scale != 1.0:
        w = lw.emit(op.multiply(w, relax.const(scale, "float32")))
    E, I, Ho = (lw.as_int(d) for d in (lw.shape(lw.get(wg))[0], lw.shape(lw.get(wg))[2], lw.shape(lw.get(wd))[2]))
    biased = any(b is not None for b in (b_gate, b_up, b_down))
    plain = not biased and a["alpha"] == 1.0 and not a["up_offset"]
    if lw.graph.name == "decode" and plain and not a["bits"]:
        # few tokens: per-expert GEMVs streaming only the chosen experts' weights (quantized experts keep the
        # TE compute, which decodes them where it reads them)
        y = _moe_gemv(lw, node, x2, idx, w, *(lw.get(v) for v in (wg, wu, wd)))
        return lw.emit(op.reshape(y, shape)) if len(shape) != 2 else y
    biases = [_f32_or_zeros(lw, b, shp) for b, shp in ((b_gate, (E, I)), (b_up, (E, I)), (b_down, (E, Ho)))] \
        if biased else []
    scales = [lw.get(ins[i]) for i in MOE_SCALES] if a["bits"] else []
    kw = dict(act=a["activation"], clamp=a["clamp"], alpha=a["alpha"], up_offset=a["up_offset"], bits=a["bits"],
              block=a["block_size"], fmt=a["format"])

    def fn(x2, idx, w, wg, wu, wd, *rest):
        b, sc = rest[:len(biases)] or (None,) * 3, rest[len(biases):] or (None,) * 3
        return moe.moe_experts(x2, idx, w, wg, wu, wd, *b, *sc, **kw)

    y = lw.bb.emit_te(fn, x2, idx, w, lw.get(wg), lw.get(wu), lw.get(wd), *biases, *scales,
                      primfunc_name_hint="moe_experts")
    out_shape = shape[:-1] + [lw.shape(lw.get(wd))[2]]
    return lw.emit(op.reshape(y, out_shape)) if len(shape) != 2 else y


def _moe_gemv(lw, node, x2, idx, w, wg, wu, wd):
    from ..kernels.portable import moe_gemv
    from .cache import GPU_TARGETS
    relax = lw.relax
    a = attrs_of(node)
    H, I = (lw.as_int(d) for d in lw.shape(wg)[1:])
    Ho = lw.as_int(lw.shape(wd)[2])
    if None in (H, I, Ho):
        raise lw.unsupported(node, "expert weights need static shapes")
    gpu = lw.target_name in GPU_TARGETS
    gate_up = moe_gemv.gate_up_func(hidden=H, inter=I, act=a["activation"], clamp=a["clamp"], gpu=gpu,
                                    x_dtype=x2.ty.dtype, w_dtype=wg.ty.dtype)
    down = moe_gemv.down_func(inter=I, out=Ho, gpu=gpu, x_dtype=x2.ty.dtype, w_dtype=wd.ty.dtype)
    gv_gu = lw.add_kernel(gate_up, "moe_gate_up_gemv")
    gv_d = lw.add_kernel(down, "moe_down_gemv")
    tokens, k = lw.shape(idx)
    hid = lw.emit(relax.call_tir(gv_gu, [x2, idx, w, wg, wu], relax.TensorType([tokens, k, I], "float32")))
    return lw.emit(relax.call_tir(gv_d, [hid, idx, wd], relax.TensorType([tokens, Ho], x2.ty.dtype)))

"""The KV-cache ops of the derived generation programs (ir/fused/cache.py), per kernel set.

`CacheUpdate` becomes `call_tir_inplace` into kernels/cpu/cache_update.py: its output IS the cache
buffer the function received, so a decode step writes k rows per sequence and never copies a
cache. Because that write is in place, every other reader of the cache (the step's
`CachedAttention`, which attends over the cache before the update) must run first:
`in_place_order` orders the nodes so. `CachedAttention` is one call_tir into
kernels/cpu/cached_attention.py; with v_in_k it never reads v_new / cache_v (placeholders go in).

The portable kernel set (the GPU targets) has the same calls into kernels/portable/: CacheUpdate in
place, and CachedAttention as two call_tirs (partial softmax states per cache split, then their
merge). Those kernels bind their loops to GPU threads on cuda/rocm and run them serially when the
cpu target builds the portable set (the numerics check).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ...ir.ops import attrs_of
from . import FLOAT_BF, lowers

UPDATE = "polyport::CacheUpdate"


def _i64(lw, v):
    x = lw.get(v)
    return x if x.ty.dtype == "int64" else lw.emit(lw.relax.op.astype(x, "int64"))


def _static(lw, node, value, axis, what):
    n = lw.as_int(lw.shape(lw.get(value))[axis])
    if n is None:
        raise lw.unsupported(node, f"its {what} must be static")
    return n


GPU_TARGETS = ("cuda", "rocm")


@lowers(UPDATE, dtypes=FLOAT_BF)
def cache_update(lw, node):
    relax = lw.relax
    cache, new = lw.get(node.inputs[0]), lw.get(node.inputs[1])
    kw = dict(kv_heads=_static(lw, node, node.inputs[0], 1, "kv heads"),
              d=_static(lw, node, node.inputs[0], 3, "head dim"), ring=bool(attrs_of(node)["ring"]),
              dtype=cache.ty.dtype)
    if lw.kernels == "cpu":
        from ..kernels.cpu import cache_update as kernel
        func = kernel.cache_update_func(**kw)
    else:
        from ..kernels.portable import cache_update as kernel
        func = kernel.cache_update_func(**kw, gpu=lw.target_name in GPU_TARGETS)
    gv = lw.add_kernel(func, "cache_update")
    args = [cache, new, _i64(lw, node.inputs[2]), _i64(lw, node.inputs[3])]
    return lw.emit(relax.call_tir_inplace(gv, args, 0, cache.ty))


@lowers("polyport::CachedAttention", dtypes=FLOAT_BF, kernels=("cpu",))
def cached_attention(lw, node):
    from ..kernels.cpu import cached_attention as kernel
    relax = lw.relax
    a = attrs_of(node)
    q, kn, vn, kc, vc = (lw.get(v) for v in node.inputs[:5])
    sinks = lw.get(node.inputs[6]) if len(node.inputs) > 6 and node.inputs[6] is not None else None
    v_in_k = bool(a["v_in_k"])
    d = _static(lw, node, node.inputs[0], 3, "query head dim")
    dv = _static(lw, node, node.inputs[2], 3, "value head dim")
    func = kernel.cached_attention_func(
        num_heads=int(a["num_heads"]), kv_heads=int(a["kv_heads"]), d=d, dv=dv, scale=float(a["scale"]),
        window=a["window"], ring=bool(a["ring"]), v_in_k=v_in_k, sinks=sinks is not None, softcap=a["softcap"],
        dtype=q.ty.dtype, sinks_dtype="float32" if sinks is None else sinks.ty.dtype)
    gv = lw.add_kernel(func, "cached_attention")
    placeholder = relax.const(np.zeros(1, np.float32))
    no_v = relax.const(np.zeros(1, np.float32), q.ty.dtype)          # the kernel's V buffers take q's dtype
    args = [q, kn, no_v if v_in_k else vn, kc, no_v if v_in_k else vc, _i64(lw, node.inputs[5]),
            placeholder if sinks is None else sinks]
    out = relax.TensorType(shape=lw.shape(q)[:3] + [dv], dtype=q.ty.dtype)
    return lw.emit(relax.call_tir(gv, args, out))


@lowers("polyport::CachedAttention", dtypes=FLOAT_BF, kernels=("portable",))
def cached_attention_portable(lw, node):
    a = attrs_of(node)
    q, kn, vn, kc, vc = (lw.get(v) for v in node.inputs[:5])
    sinks = lw.get(node.inputs[6]) if len(node.inputs) > 6 and node.inputs[6] is not None else None
    return streamed_attention(lw, node, q, kn, vn, kc, vc, _i64(lw, node.inputs[5]), sinks, window=a["window"],
                              ring=bool(a["ring"]), v_in_k=bool(a["v_in_k"]))


def streamed_attention(lw, node, q, kn, vn, kc, vc, past, sinks, *, window: int, ring: bool, v_in_k: bool,
                       max_splits: Optional[int] = None):
    """kernels/portable/cached_attention.py's partial + merge: `q` over the cache (`kc`, `vc` before this
    step, `past` int64 [B] positions held) and the new rows `kn`, `vn` (causal)."""
    from ..kernels.portable import cached_attention as kernel
    relax = lw.relax
    a = attrs_of(node)
    h, kvh = int(a["num_heads"]), int(a["kv_heads"])
    d = lw.as_int(lw.shape(q)[3])
    dv = lw.as_int(lw.shape(vn)[3])
    if d is None or dv is None:
        raise lw.unsupported(node, "head dims must be static")
    gpu = lw.target_name in GPU_TARGETS
    splits = max_splits or kernel.MAX_SPLITS
    try:
        partial = kernel.partial_func(num_heads=h, kv_heads=kvh, d=d, dv=dv, scale=float(a["scale"]), window=window,
                                      ring=ring, v_in_k=v_in_k, gpu=gpu, dtype=q.ty.dtype, max_splits=splits,
                                      softcap=float(a["softcap"]))
    except ValueError as e:
        raise lw.unsupported(node, str(e)) from None
    merge = kernel.merge_func(num_heads=h, kv_heads=kvh, dv=dv, sinks=sinks is not None, gpu=gpu,
                              dtype=q.ty.dtype, sinks_dtype="float32" if sinks is None else sinks.ty.dtype,
                              max_splits=splits)
    gv_p = lw.add_kernel(partial, "cached_attention_partial")
    gv_m = lw.add_kernel(merge, "cached_attention_merge")
    placeholder = relax.const(np.zeros(1, np.float32))
    no_v = relax.const(np.zeros(1, np.float32), q.ty.dtype)          # the kernel's V buffers take q's dtype
    B, _, S, _ = lw.shape(q)
    states = [B * kvh, splits, S, h // kvh]
    parts = lw.emit(relax.call_tir(gv_p, [q, kn, no_v if v_in_k else vn, kc, no_v if v_in_k else vc,
                                          past],
                                   [relax.TensorType(states + [2], "float32"),
                                    relax.TensorType(states + [dv], "float32")]))
    pm, pa = (lw.emit(relax.TupleGetItem(parts, i)) for i in range(2))
    out = relax.TensorType(shape=lw.shape(q)[:3] + [dv], dtype=q.ty.dtype)
    return lw.emit(relax.call_tir(gv_m, [pm, pa, past, placeholder if sinks is None else sinks], out))


def in_place_order(nodes):
    """`nodes` (topologically sorted) with each CacheUpdate moved after every other reader of the
    cache it overwrites."""
    pending, done = [], set()
    for node in nodes:
        if node.qualified_op == UPDATE:
            pending.append(node)
        else:
            yield node
            done.add(id(node))
        for upd in list(pending):
            if all(id(user) in done or user is upd for user, _ in upd.inputs[0].uses):
                pending.remove(upd)
                done.add(id(upd))
                yield upd
    yield from pending

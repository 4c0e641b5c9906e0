"""CPU schedules for the Relax module the cpu target builds (see /work/shared/TVM_NOTES.md).

The hot kernels are the ones polyport emits itself (targets/kernels/cpu). The TE
ones (dense MatMul / GatedMLP over row-major weights) and the legalized Relax
matmuls (the module is legalized first: targets/cpu.py) are found by their block
names and scheduled by hand:

- GEMM-like blocks `C[.., i, j] = sum_k A[.., i, k] * W[.., k, j]` (W row-major [K, N],
  so `W[k, j0:j0+NB]` is contiguous): loop order `(batch . jo) (parallel) . io . k .
  ii (unroll) . ji (vectorize)`, accumulating in a local `cache_write` block,
  reduction decomposed. M (the token count) is symbolic; its tail is predicated.
- MoE, Attention and the GEMMs over pre-packed weights are written scheduled
  (kernels/cpu/moe.py, attention.py, gemm.py); functions that already carry
  `op_pattern` are left as they are.

A scheduled function is marked opaque (`op_pattern` 8) so fusion (targets/fusion.py)
leaves it alone. The injective kernels (what fusion merges, and single ops such as a
transpose) are scheduled afterwards (`schedule_injective`): intermediate blocks inlined
(FuseTIR keeps a loop nest and a scratch buffer per original op, which made deepseek_v3_a's
two MLA RoPE kernels 8% of its kernel time) and the innermost loop vectorized. Any schedule that fails
to apply leaves the function as TE built it (correct, only slower); nothing here changes
results.
"""
from __future__ import annotations

import logging
import math

from .fusion import OPAQUE
from .kernels.cpu.parallel import BUILD_TIME_ROWS, PARALLEL_MIN_MACS

log = logging.getLogger(__name__)

NB, MB = 32, 4


def _sch(func):
    from tvm import s_tir
    return s_tir.Schedule(func)


def _has(sch, name):
    try:
        sch.get_sblock(name)
        return True
    except Exception:
        return False


def _static(extent):
    v = getattr(extent, "value", None)
    return int(v) if isinstance(v, int) else None


def _gemm(sch, name: str) -> bool:
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    if len(loops) < 3:
        raise ValueError(f"{name}: {len(loops)} loops")
    *batch, i, j, k = loops          # batch: a batched matmul's leading loops (DeepSeek V4's hyper-connections)
    n = _static(sch.get(j).extent)
    nb = NB if n is None or n % NB == 0 else (16 if n % 16 == 0 else 8 if n % 8 == 0 else 1)
    jo, ji = sch.split(j, [None, nb])
    io, ii = sch.split(i, [None, MB])      # 4-row blocks amortise row-major W's strided loads
    sch.reorder(*batch, jo, io, k, ii, ji)
    cw = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(cw, io)
    sch.vectorize(ji)
    sch.unroll(ii)
    kk = _static(sch.get(k).extent)
    copies = [_static(sch.get(b).extent) for b in batch]
    big = n is None or kk is None or None in copies or \
        n * kk * BUILD_TIME_ROWS * math.prod(copies) >= PARALLEL_MIN_MACS
    if big:
        sch.parallel(sch.fuse(*batch, jo) if batch else jo)
    sch.decompose_reduction(blk, k)
    loops = sch.get_loops(cw)
    sch.vectorize(sch.split(loops[-1], [None, nb])[-1]) if nb > 1 else None
    return big


def _elementwise_parallel(sch, name: str, parallel: bool = True) -> None:
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    if len(loops) >= 2:
        if parallel:
            sch.parallel(loops[0])
        n = _static(sch.get(loops[-1]).extent)
        if n and n % 8 == 0:
            sch.vectorize(sch.split(loops[-1], [None, 8])[-1])




def schedule_func(func):
    """Schedule one PrimFunc if it is one of polyport's kernels; return (func, scheduled)."""
    sch = _sch(func)
    names = {sch.get(b).name_hint for b in _all_blocks(sch)}
    if "gated" in names and "gate" in names:
        big = _gemm(sch, "gate")
        _gemm(sch, "up")
        _elementwise_parallel(sch, "gated", big)
    elif names == {"matmul"}:
        _gemm(sch, "matmul")
    else:
        return func, False
    return sch.mod["main"], True


def _all_blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def schedule_module(mod, target):
    """Schedule polyport's kernels in `mod` (a Relax IRModule); return the module for `tvm.compile`."""
    from tvm import tirx
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or "op_pattern" in (func.attrs or {}):
            continue                     # not TIR, or written scheduled (kernels/cpu/attention.py)
        try:
            new, done = schedule_func(func)
        except Exception as e:  # keep the unscheduled (correct) kernel
            log.warning("cpu: no schedule for %s: %s", gv.name_hint, str(e).splitlines()[0] if str(e) else e)
            continue
        if done:
            updates[gv] = new.with_attr("op_pattern", OPAQUE)
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _injective_func(func, lanes: int):
    """`func` inlined into one loop nest, its innermost loop vectorized; None if it is not injective or
    nothing applies."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline
    sch = _sch(func)
    blocks = normalize_prim_func(sch)
    if not blocks or not all(b.is_injective() for b in blocks):
        return None
    n = len(blocks)
    changed = len(try_inline(sch, blocks)) < n        # (it pops what it inlined from `blocks`)
    for b in blocks:
        loops = sch.get_loops(b.block_rv)
        extent = _static(sch.get(loops[-1]).extent) if loops else None
        width = next((w for w in (lanes, 8) if extent and extent % w == 0), 0)
        if width:
            sch.vectorize(sch.split(loops[-1], [None, width])[-1])
            changed = True
    return sch.mod["main"] if changed else None


def schedule_injective(mod):
    """Each injective kernel (what fusion merged, and the single ops TE built unscheduled) as one loop
    nest with its innermost loop vectorized: FuseTIR leaves one loop nest and one scratch buffer per
    original op, and TVM's cpu pipeline schedules none of it (scalar loops: deepseek_v3_a's MLA RoPE
    kernels 26 -> 13 us a run vectorized). The innermost loop is split by the vector width when its
    static extent is a multiple of it (else of 8); a symbolic one is left scalar. As in
    `schedule_module`, a kernel the schedule does not apply to stays as it was (correct, only slower)."""
    from tvm import tirx
    from .kernels.cpu.isa import vector_lanes
    lanes = vector_lanes()
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or "op_pattern" in (func.attrs or {}):
            continue
        try:
            new = _injective_func(func, lanes)
        except Exception as e:  # keep the unscheduled (correct) kernel
            log.warning("cpu: no injective schedule for %s: %s", gv.name_hint,
                        str(e).splitlines()[0] if str(e) else e)
            continue
        if new is not None:
            updates[gv] = new
    mod = mod.clone()           # a pass: the module given stays as it was
    for gv, f in updates.items():
        mod[gv] = f
    return mod

"""GPU schedules for the Relax module the cuda and rocm targets build.

The module is legalized and fused the way TVM's own GPU pipelines do it, then
every PrimFunc is scheduled with `tvm.s_tir.dlight`'s GPU rules (Matmul, GEMV,
Reduction, GeneralReduction, Fallback: the first rule that applies wins). The
fused-op kernels are the TE computes in targets/kernels/cpu, whose numerics the
cpu target checks; a schedule only reorders and binds their loops.

What is checked here: every kernel ends up bound to GPU threads (TVM's memory
verifier refuses an unbound one, with a message that names no model node; this
module names the kernel and its blocks instead). What is not: GPU numerics and
speed, which need a GPU. The schedules are dlight's generic ones; no
attention- or MoE-specific GPU schedule exists yet.
"""
from __future__ import annotations

import re

from .. import errors


def gpu_rules():
    from tvm.s_tir import dlight as dl
    return (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())


def _legalize_and_fuse():
    from tvm import relax
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]


def _is_scheduled(func) -> bool:
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def _block_names(func) -> list[str]:
    return [n for n in re.findall(r'T\.sblock\("([^"]+)"', func.script()) if n != "root"]


def schedule_module(mod, target, target_name: str):
    """Legalize, fuse and schedule `mod` for `target`; raise naming any kernel no rule could schedule."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl
    with target:
        mod = tvm.transform.Sequential(_legalize_and_fuse() + [dl.ApplyDefaultSchedule(*gpu_rules())])(mod)
    # dlight marks what a rule scheduled (bound to GPU threads); anything else would fail TVM's memory verifier
    unbound = [(gv.name_hint, f) for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and not _is_scheduled(f)]
    if unbound:
        detail = "; ".join(f"{name} (blocks: {', '.join(_block_names(f)[:8])})" for name, f in unbound)
        raise errors.UnsupportedOpError(
            f"{target_name} target ({target.attrs.get('arch') or target.attrs.get('mcpu')}): no GPU schedule "
            f"applies to kernel(s) {detail}; the kernel name is the fused op (attention, moe_experts, rms_norm, "
            "rotary, gated_mlp_*, dense*) or the ONNX op it came from")
    return mod

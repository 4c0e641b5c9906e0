"""GPU schedules for the Relax module the cuda and rocm targets build.

The module is legalized and fused the way TVM's own GPU pipelines do it, then
every PrimFunc is scheduled with `tvm.s_tir.dlight`'s GPU rules (Matmul, GEMV,
Reduction, GeneralReduction, Fallback: the first rule that applies wins). The
fused-op kernels are the portable kernel set (targets/kernels/portable), whose
numerics the cpu target checks; a schedule only reorders and binds their loops.

What is checked here: every kernel ends up bound to GPU threads (TVM's memory
verifier refuses an unbound one, with a message that names no model node; this
module names the kernel and its blocks instead). What is not: GPU numerics and
speed, which need a GPU. The schedules are dlight's generic ones, except for the
kernels in kernels/portable that bind their own threads (decode and causal attention,
the KV-cache update, the decode program's MoE GEMVs), marked scheduled.
"""
from __future__ import annotations

import re

from .. import errors
from .fusion import legalize_and_fuse


def gpu_rules():
    from tvm.s_tir import dlight as dl
    return (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())


def _is_scheduled(func) -> bool:
    attrs = func.attrs
    return (attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])) \
        or _launches_threads(func)


def _launches_threads(func) -> bool:
    """Legalized with GPU threads already bound (topi's GPU ScatterElements): nothing for dlight to do."""
    return 'T.launch_thread("threadIdx.' in func.script()


def _block_names(func) -> list[str]:
    return [n for n in re.findall(r'T\.sblock\("([^"]+)"', func.script()) if n != "root"]


# primfunc_name_hint of each fused-op kernel (targets/tvm_lower.py) -> the IR op it lowers
KERNEL_OPS = {"cached_attention": "polyport::CachedAttention", "cache_update": "polyport::CacheUpdate",
              "attention": "polyport::Attention", "moe_experts": "polyport::MoE", "rms_norm": "polyport::RMSNorm",
              "rotary": "polyport::Rotary", "gated_mlp": "polyport::GatedMLP", "dense": "MatMul"}


def _nodes_of(kernel: str, graph) -> str:
    """The model nodes a kernel comes from, as far as its name tells (fused-op kernels keep their op's name)."""
    if graph is None:
        return ""
    ops = {op for key, op in KERNEL_OPS.items() if key in kernel}
    names = [n.name for n in graph.nodes if n.qualified_op in ops]
    if not names:
        return ""
    more = f", … ({len(names)} in all)" if len(names) > 3 else ""
    return f", from node(s) {', '.join(names[:3])}{more} ({', '.join(sorted(ops))})"


def schedule_module(mod, target, target_name: str, graph=None):
    """Legalize, fuse and schedule `mod` for `target`; raise naming any kernel no rule could schedule
    (and, for fused-op kernels, the nodes of `graph` it lowers)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl
    with target:
        mod = tvm.transform.Sequential(legalize_and_fuse() + [dl.ApplyDefaultSchedule(*gpu_rules())])(mod)
    # dlight marks what a rule scheduled (bound to GPU threads); anything else would fail TVM's memory verifier
    unbound = [(gv.name_hint, f) for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and not _is_scheduled(f)]
    if unbound:
        unbound.sort(key=lambda item: not any(key in item[0] for key in KERNEL_OPS))   # fused-op kernels first
        detail = "; ".join(f"{name} (blocks: {', '.join(_block_names(f)[:8])}{_nodes_of(name, graph)})"
                           for name, f in unbound[:6])
        detail += f"; and {len(unbound) - 6} more" if len(unbound) > 6 else ""
        raise errors.UnsupportedOpError(
            f"{target_name} target ({target.attrs.get('arch') or target.attrs.get('mcpu')}): no GPU schedule "
            f"applies to kernel(s) {detail}; other kernels are named after the ONNX ops they came from")
    return mod

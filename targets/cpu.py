"""The cpu target: fused IR -> Relax/TIR (targets/tvm_lower.py) -> scheduled -> LLVM shared library.

Writes `cpu/model.so` (the Relax VM executable, exported with `export_library`)
and `cpu/model.json` (input, weight-parameter and output names in the order the
VM function takes / returns them; `packed`: weights bound pre-packed, [.., K, N] as
[.., N/NB, K, NB], by the loader). Weights stay in the artifact's
weights.safetensors and are bound at load time.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from .. import errors
from ..devices import HOST_CPU, host_cpu_info
from ..ir.graph import Graph
from .base import CompileOptions, Target, register_target
from .vm_meta import model_meta, write_model_meta

GENERIC_MCPU = "x86-64-v3"

def host_mcpu() -> str:
    """The LLVM CPU name for this host (upgraded to an AVX-512 name where the flags say so)."""
    info = host_cpu_info()
    flags, vendor = info["flags"], info["vendor_id"]
    try:
        import tvm.target.codegen as cg
        name = cg.llvm_get_system_cpu()
    except Exception:
        name = ""
    if "avx512f" in flags and name in ("", "generic", "znver1", "znver2", "znver3", "x86-64"):
        return "znver4" if vendor == "AuthenticAMD" else "skylake-avx512"
    if not name or name == "generic":
        return GENERIC_MCPU
    return name


def _kernels(options: CompileOptions) -> str:
    return (options.extra or {}).get("kernels", "cpu")


@register_target
class CpuTarget(Target):
    name = "cpu"
    devices = {"cpu": HOST_CPU}
    default_device = "cpu"
    decodes_compressed = True

    def check_options(self, options: CompileOptions) -> None:
        if self.compute_dtype(options) != "f32" and _kernels(options) != "portable":
            raise errors.PolyportError(f"cpu target: {options.compute} activations need the portable kernel set "
                                       "(the cpu kernels compute f32 activations)")

    def build(self, graph: Graph, options: CompileOptions, programs: Any = None) -> tuple[Any, dict, str]:
        """Lower, schedule and compile `graph`: (the Relax VM executable, its model.json metadata, mcpu).

        `programs` (passes/derive_generation.py's GenerationPrograms): its prefill and decode graphs
        become the Relax functions `prefill` and `decode` of the same executable, sharing the weights.
        `lower` writes the executable into an artifact; the ONNX backend (backend/cpu.py) runs it in memory."""
        try:
            import tvm
        except ImportError as e:  # pragma: no cover - tvm is a dependency
            raise errors.PolyportError(f"cpu target: apache-tvm is not importable ({e})") from None
        from .build_errors import naming_the_node
        from .fresh_outputs import fresh_outputs
        from .fusion import fuse, legalize
        from .llvm_noalias import build_pipeline
        from .schedule_cpu import schedule_injective, schedule_module
        from .tvm_lower import lower_functions, lower_to_relax

        if options.dtype not in ("f32", "bf16", "f16"):   # bf16 / f16: 16-bit weights (compiler.py), f32 compute
            raise errors.PolyportError(f"cpu target: dtype {options.dtype} is not supported (f32, bf16, f16)")
        mcpu = (options.extra or {}).get("mcpu") or host_mcpu()
        kernels = _kernels(options)
        derived = {name: g for name, g in (("prefill", getattr(programs, "prefill", None)),
                                           ("decode", getattr(programs, "decode", None))) if g is not None}
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        with target:            # kernels size their register tiles by the target's vectors
            if derived:
                functions = lower_functions({"main": graph, **derived}, self.name, kernels=kernels)
                lowered = functions.pop("main")
            else:
                lowered, functions = lower_to_relax(graph, self.name, kernels=kernels), None
        with naming_the_node([lowered, *(functions or {}).values()], self.name):
            with target:      # scheduled kernels (legalized matmuls too) are opaque: fusion leaves them whole
                mod = schedule_module(tvm.transform.Sequential(legalize())(lowered.mod), target)
                fused = tvm.transform.Sequential([*fuse(), tvm.relax.transform.RewriteDataflowReshape()])(mod)
                mod = schedule_injective(fused)
            fresh = fresh_outputs(mod["main"])
            ex = tvm.compile(mod, target=target, relax_pipeline=build_pipeline())
        return ex, {**model_meta(lowered, functions), "fresh_outputs": fresh}, mcpu

    def lower(self, graph: Graph, out_dir: Path, weights: Mapping[str, Any], options: CompileOptions,
              programs: Any = None) -> dict:
        """Build `main` and the derived `prefill` / `decode` into one library: one LLVM build, the
        weights shared (with either kernel set: the portable one is how the GPU kernels are checked)."""
        entry = self._write(graph, programs, out_dir, weights, options)
        return {**entry, "programs": ["prefill", "decode"]} if programs is not None else entry

    def _write(self, graph: Graph, programs: Any, out_dir: Path, weights: Mapping[str, Any],
               options: CompileOptions) -> dict:
        import tvm
        t0 = time.perf_counter()
        ex, meta, mcpu = self.build(graph, options, programs)
        for name, f in meta.get("functions", {}).items():
            missing = [w for w in f["params"] if w not in weights]
            if missing:
                raise errors.PolyportError(f"cpu target: the {name} program uses weight {missing[0]!r} that the "
                                           "artifact does not store")
        out_dir = Path(out_dir)
        ex.export_library(str(out_dir / "model.so"))
        write_model_meta(meta, out_dir / "model.json")
        return {"archs": ["x86_64"], "dtype": self.compute_dtype(options), "mcpu": mcpu, "tvm_version": tvm.__version__, "files": ["cpu/model.so", "cpu/model.json"],
                "library": "cpu/model.so", "meta": "cpu/model.json",
                "compile_seconds": round(time.perf_counter() - t0, 2)}

"""What the cuda and rocm targets share: arch selection, lowering, GPU scheduling, one build per arch.

For target T it writes (the contract the GPU runtime loader reads):

    T/model.json          as cpu/model.json; `packed` is always {} (GPU weights are bound as stored)
    T/<arch>/model.so     the Relax VM executable (`export_library`) with that arch's device code
                          embedded (CUDA: an nvcc fatbin; ROCm: the linked HSACO code object)

and returns the manifest entry {archs, libraries, meta, files, toolchain, kernels, compile_seconds},
plus `"programs": ["prefill", "decode"]` when the derived generation programs were given: they
become the VM functions `prefill` and `decode` of the same library (model.json's "functions"),
sharing the weights with `main`, as on the cpu target.

Built and checked here, without a GPU: the device code for each arch and the
kernel names it holds. Not checked: GPU numerics and speed (no GPU here); the
kernels are the portable kernel set (targets/kernels/portable), whose numerics
the cpu target checks by building the same kernels for LLVM.
"""
from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .. import errors
from ..devices import DEVICES, TARGET_DEVICES
from ..ir.graph import Graph
from .base import CompileOptions, Target
from .vm_meta import model_meta, write_model_meta

# Every arch a GPU target accepts, by target: a compile with targets of both families and a
# mixed --arch list gives each target its own archs.
KNOWN_ARCHS: dict[str, tuple[str, ...]] = {}


class GpuTarget(Target, abc.ABC):
    default_archs: ClassVar[tuple[str, ...]]
    known_archs: ClassVar[tuple[str, ...]]
    # Batch-1 programs: over a symbolic batch the GPU decode kernels build since targets/fusion.py keeps
    # scalar kernels out of FuseTIR (llama_a, qwen3_moe_a, deepseek_v3_a for cuda and rocm), but no GPU
    # has run them yet.
    batched_programs = False
    decodes_compressed = True        # the CSA/HCA programs are standard ops plus fused ops the portable set lowers

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        KNOWN_ARCHS[cls.name] = cls.known_archs
        cls.devices = {d: DEVICES[d] for d in TARGET_DEVICES[cls.name]}
        cls.default_device = TARGET_DEVICES[cls.name][0]

    # ---- what each GPU target provides ------------------------------------------------------
    @abc.abstractmethod
    def check_toolchain(self) -> dict[str, str]:
        """Raise a ToolchainError naming what is missing (and how to install it); return tool versions."""

    @abc.abstractmethod
    def tvm_target(self, arch: str) -> Any:
        ...

    def build(self, mod, target):
        import tvm
        return tvm.compile(mod, target=target)

    @abc.abstractmethod
    def export(self, ex, target, path: Path) -> list[str]:
        """Write `ex` with real device code for `target` to `path`; return the device kernel names."""

    # ---- shared ---------------------------------------------------------------------------------
    def select_archs(self, options: CompileOptions) -> tuple[str, ...]:
        """This target's archs from --arch (those of other GPU targets are theirs); the default set if none."""
        mine = []
        for arch in options.archs:
            if arch in self.known_archs:
                mine.append(arch)
            elif not any(arch in archs for archs in KNOWN_ARCHS.values()):
                known = "; ".join(f"{t}: {', '.join(a)}" for t, a in sorted(KNOWN_ARCHS.items()))
                raise errors.PolyportError(f"{self.name} target: unknown arch {arch!r}; known archs: {known}")
        return tuple(dict.fromkeys(mine)) or self.default_archs

    def check_options(self, options: CompileOptions) -> None:
        self.select_archs(options)

    def compute_dtype(self, options: CompileOptions) -> str:
        """--dtype bf16 | f16 is the activations' dtype too (kernels accumulate in f32)."""
        return options.compute or options.dtype

    def lower(self, graph: Graph, out_dir: Path, weights: Mapping[str, Any], options: CompileOptions,
              programs: Any = None) -> dict:
        archs = self.select_archs(options)
        if options.dtype not in ("f32", "bf16", "f16"):   # bf16 / f16: passes/compute_dtype.py ran (compiler.py)
            raise errors.PolyportError(f"{self.name} target: dtype {options.dtype} is not supported (f32, bf16, f16)")
        toolchain = self.check_toolchain()
        import tvm
        from .build_errors import naming_the_node
        from .schedule_gpu import schedule_module
        from .tvm_lower import lower_functions, lower_to_relax

        t0 = time.perf_counter()
        derived = {name: g for name, g in (("prefill", getattr(programs, "prefill", None)),
                                           ("decode", getattr(programs, "decode", None))) if g is not None}
        if derived:
            functions = lower_functions({"main": graph, **derived}, self.name, kernels="portable")
            lowered = functions.pop("main")
        else:
            lowered, functions = lower_to_relax(graph, self.name, kernels="portable"), None
        out_dir = Path(out_dir)
        libraries, kernels = {}, {}
        for arch in archs:
            target = self.tvm_target(arch)
            with naming_the_node([lowered, *(functions or {}).values()], self.name):
                mod = schedule_module(lowered.mod, target, self.name, graph)
                ex = self.build(mod, target)
            (out_dir / arch).mkdir(parents=True, exist_ok=True)
            kernels[arch] = self.export(ex, target, out_dir / arch / "model.so")
            libraries[arch] = f"{self.name}/{arch}/model.so"
        write_model_meta(model_meta(lowered, functions), out_dir / "model.json")
        entry = {"archs": list(archs), "dtype": self.compute_dtype(options), "libraries": libraries, "meta": f"{self.name}/model.json",
                 "files": [f"{self.name}/model.json", *libraries.values()],
                 "toolchain": {"tvm": tvm.__version__, **toolchain}, "kernels": kernels,
                 "checked": "device code built per arch (kernel names from the module's function table); "
                            "not run: numerics and speed need a GPU",
                 "compile_seconds": round(time.perf_counter() - t0, 2)}
        return {**entry, "programs": ["prefill", "decode"]} if functions else entry

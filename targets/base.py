"""The Target interface every code generator implements.

A target lowers a fused graph into its own folder of the artifact and returns
the manifest entry describing what it wrote (architectures, toolchain, files,
what was checked). Loading is the runtime's business: `runtime/session.py`
finds a target's loader by name, so the runtime never imports the compiler.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional

from ..devices import DeviceSpec
from ..errors import PolyportError
from ..ir.graph import Graph


@dataclasses.dataclass
class CompileOptions:
    dtype: str = "f32"                   # --dtype: f32 | bf16 | f16 (what each target does with it: compute_dtype)
    compute: Optional[str] = None        # the activations' dtype; None: the target's own for `dtype`
    archs: tuple[str, ...] = ()          # target-specific architectures (sm_90, gfx942, ...); () = the default set
    # target-specific settings: "mcpu", "kernels" (cpu: "cpu" | "portable")
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Target(abc.ABC):
    name: ClassVar[str]
    devices: ClassVar[Mapping[str, DeviceSpec]]
    default_device: ClassVar[str]
    known_archs: ClassVar[tuple[str, ...]] = ()     # what --arch may name for this target (none: it takes no --arch)
    # False: this target builds derived prefill/decode programs with a static batch of 1 only (the artifact's
    # programs then keep the export's batch 1: one cache per sequence, passes/generation_batch.py)
    batched_programs: ClassVar[bool] = True
    decodes_compressed: ClassVar[bool] = False      # builds programs with DeepSeek V4's CSA/HCA caches

    @abc.abstractmethod
    def lower(self, graph: Graph, out_dir: Path, weights: Mapping[str, Any], options: CompileOptions,
              programs: Any = None) -> dict:
        """Write this target's files into `out_dir`; return its manifest entry.

        `weights` maps the graph's constant names to the arrays stored once in
        the artifact's weights.safetensors. `programs` (passes/derive_generation.py),
        given when every attention can be cached: a target that can decode builds its
        prefill and decode beside the cache-less program and lists them in the entry
        (`"programs": ["prefill", "decode"]`); one that cannot ignores them, and its
        sessions generate by recomputing the sequence."""

    def check_options(self, options: CompileOptions) -> None:
        """Raise a PolyportError for options this target cannot honour (an unknown arch), before any work."""

    def compute_dtype(self, options: CompileOptions) -> Optional[str]:
        """The dtype of the activations of the graph this target lowers (16-bit: compile_model runs
        passes/compute_dtype.py first); None for a target that converts the graph itself (ascend).
        By default f32, with `dtype` only the weights' storage."""
        return options.compute or "f32"

    def device(self, name: str | None = None) -> DeviceSpec:
        name = name or self.default_device
        try:
            return self.devices[name]
        except KeyError:
            raise PolyportError(f"target {self.name}: unknown device {name!r}; known: "
                                f"{', '.join(self.devices)}") from None


_TARGETS: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    _TARGETS[cls.name] = cls
    return cls


def get_target(name: str) -> Target:
    from . import registry  # noqa: F401 - imports every target module
    try:
        return _TARGETS[name]()
    except KeyError:
        raise PolyportError(f"unknown target {name!r}; known: {', '.join(target_names())}") from None


def target_names() -> list[str]:
    from . import registry  # noqa: F401
    from ..devices import TARGETS
    return sorted(_TARGETS, key=lambda t: TARGETS.index(t) if t in TARGETS else len(TARGETS))

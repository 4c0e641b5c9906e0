"""`polyport.load(ART, target=...)`: a session over one target's part of an artifact.

Each target's loader lives in its own runtime module, found here by name, so
loading an artifact never imports the compiler.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping, Protocol

import numpy as np

from .. import errors
from ..ir import dtypes
from ..ir.symbolic import parse
from ..ir.types import TensorType
from ..devices import TARGETS
from .artifact import Artifact

LOADERS = {
    "cpu": "polyport.runtime.cpu_session",
    "cuda": "polyport.runtime.gpu_session",
    "rocm": "polyport.runtime.gpu_session",
    "ascend": "polyport.runtime.ascend_emulator",
}


class Session(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def load(path: str | os.PathLike, target: str = "cpu", **options: Any) -> Session:
    """Open the artifact at `path` for `target`, checking the hashes of every file it uses."""
    if target not in LOADERS:
        raise errors.PolyportError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    art = Artifact(path)
    entry = art.target_entry(target)
    art.verify(target)
    module = importlib.import_module(LOADERS[target])
    return module.load(art, entry, target=target, **options)


def signature_types(specs: list[dict]) -> list[tuple[str, TensorType]]:
    """The manifest's input/output specs as (name, TensorType)."""
    out = []
    for s in specs:
        shape = None if s["shape"] is None else tuple(None if d is None else parse(d) for d in s["shape"])
        out.append((s["name"], TensorType(dtypes.from_name(s["dtype"]), shape)))
    return out


def signature_index_ranges(specs: list[dict]) -> dict[str, tuple[int, int]]:
    """The manifest's `index_range` of each index input (token ids), as {name: (lowest, highest)}."""
    ranges = {s["name"]: s["index_range"] for s in specs if s.get("index_range") is not None}
    for name, r in ranges.items():
        if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and r[0] <= r[1]):
            raise ValueError(f"index_range of {name!r} is {r!r}, not [lowest, highest]")
    return {name: (lo, hi) for name, (lo, hi) in ranges.items()}

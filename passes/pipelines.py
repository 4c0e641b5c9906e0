"""Named pipelines: explicit lists of passes, viewable step by step with --dump-ir."""
from __future__ import annotations

from ..ir.graph import Graph
from . import canonicalize  # noqa: F401 - registers canonicalisation passes
from . import fuse_mlp, fuse_rmsnorm, fuse_rotary  # noqa: F401 - register the fusions
from . import fuse_moe  # noqa: F401 - registers fuse-moe
from . import fuse_attention  # noqa: F401 - registers fuse-attention
from . import fuse_compress  # noqa: F401 - registers fuse-compress
from . import quant_matmul  # noqa: F401 - registers quant-matmul
from . import block_dequant  # noqa: F401 - registers decode-low-bit
from .manager import PassManager

PIPELINES: dict[str, list[str]] = {
    "none": [],
    "canonicalize": ["canonicalize"],
    "default": ["canonicalize", "quant-matmul", "fuse-rmsnorm", "fuse-rotary", "fuse-attention", "fuse-moe", "fuse-compress", "fuse-gated-mlp",
                "canonicalize", "decode-low-bit"],     # last: folding would decode small codes into f32
}
# `generate`: the default pipeline, then the KV-cache programs derived from it (passes/derive_generation.py);
# `inspect --passes generate` prints them with each layer's cache layout.
PIPELINES["generate"] = PIPELINES["default"]


def run_pipeline(graph: Graph, name: str = "default", **manager_options) -> PassManager:
    from ..errors import PolyportError
    if name not in PIPELINES:
        raise PolyportError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    pm = PassManager(PIPELINES[name], **manager_options)
    pm.run(graph)
    return pm

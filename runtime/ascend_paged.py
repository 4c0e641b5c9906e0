"""The ascend session's paged KV caches: blocks, block tables and slot mappings (targets/ascend/programs.py).

What vLLM-Ascend's model runner prepares on the host before each step: every sequence owns blocks of
`block_size` slots; its block table maps logical block i (positions i*bs .. i*bs+bs-1) to a physical
block; each new row goes to slot table[p // bs] * bs + p % bs. A sliding-window group gives each sequence a
ring of `ring_blocks` blocks, its table repeating them, so memory stays bounded by the window. One scratch
block per group, which no table references, takes the rows a step must not keep (prompt padding, prompt
rows older than a ring holds).
"""
from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PagedCache:
    """The caches of one generation (`new_cache`): arrays by input name, and each group's block table."""

    def __init__(self, layout: Mapping, batch: int, max_length: int):
        self.block_size = bs = int(layout["block_size"])
        self.groups = {}
        self.tables: dict[str, np.ndarray] = {}
        self.blocks: dict[str, int] = {}                        # physical blocks per group, scratch included
        width = _cdiv(max_length, bs)
        for name, g in layout["groups"].items():
            ring = g.get("ring_blocks")
            per_seq = int(ring) if ring else width
            self.groups[name] = {"window": g.get("window"), "ring_slots": per_seq * bs if ring else None}
            own = np.arange(batch)[:, None] * per_seq
            self.tables[name] = (own + np.arange(width)[None, :] % per_seq).astype(np.int32)
            self.blocks[name] = batch * per_seq + 1              # + the scratch block (the last one)
        dtype = ml_dtypes.bfloat16 if layout.get("dtype") == "bfloat16" else np.float16
        self.arrays = {c["name"]: np.zeros((self.blocks[c["group"]], bs, c["kv_heads"], c["head_dim"]), dtype)
                       for c in layout["caches"]}

    @property
    def max_step(self) -> int:
        """The most new rows a decode step may write before it reads: a ring must still hold every position
        the step's first query sees (ring slots - window + 1)."""
        steps = [g["ring_slots"] - g["window"] + 1 for g in self.groups.values() if g["ring_slots"]]
        return min(steps) if steps else 1 << 62

    def feeds(self, past: np.ndarray, n_new: np.ndarray, step: int) -> dict[str, np.ndarray]:
        """Block tables, slot mappings and the caches for a step of `step` rows (n_new[b] of them real)."""
        out: dict[str, np.ndarray] = dict(self.arrays)
        bs = self.block_size
        rows = np.arange(step)[None, :]
        pos = past[:, None] + rows
        for name, g in self.groups.items():
            table = self.tables[name]
            keep = rows < n_new[:, None]
            if g["ring_slots"]:
                keep &= rows >= n_new[:, None] - g["ring_slots"]
            block = np.take_along_axis(table, np.minimum(pos // bs, table.shape[1] - 1), axis=1)
            scratch = (self.blocks[name] - 1) * bs + rows % bs
            out[f"block_table.{name}"] = table
            out[f"slot_mapping.{name}"] = np.where(keep, block * bs + pos % bs, scratch).reshape(-1).astype(np.int32)
        return out


"""Deterministic inputs for a model signature: what `polyport run --seq N` and `polyport bench` feed."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import errors
from ..ir.types import TensorType


def generated_feeds(specs: Sequence[tuple[str, Any]], n: int, seed: int = 0,
                    what: str = "--seq") -> dict[str, np.ndarray]:
    """Deterministic inputs for (name, type) `specs` with every symbolic dim bound to `n`.

    Integer inputs get integers in [0, 100) (token ids), float inputs standard
    normal values, bool inputs random booleans; drawn in input order from one
    `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, t in specs:
        if not isinstance(t, TensorType) or t.shape is None or t.dtype is None:
            raise errors.InputError(f"{what}: input {name!r} has type {t}; give it with --input NAME=FILE.npy")
        shape = []
        for d in t.shape:
            if d is None:
                raise errors.InputError(f"{what}: input {name!r} has an unknown dim ({t}); "
                                        f"give it with --input NAME=FILE.npy")
            shape.append(d if isinstance(d, int) else d.evaluate({s: n for s in d.symbols}))
        if any(s < 0 for s in shape):
            raise errors.InputError(f"{what} {n}: input {name!r} would have the negative shape {shape} ({t})")
        dt = t.dtype
        if dt.is_integer:
            x = rng.integers(0, 100, size=shape, dtype=np.int64).astype(dt.numpy)
        elif dt.is_float and dt.numpy is not None:
            x = rng.standard_normal(size=shape, dtype=np.float32).astype(dt.numpy)
        elif dt.name == "bool":
            x = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise errors.InputError(f"{what}: cannot generate {dt} input {name!r}; give it with --input")
        feeds[name] = x
    return feeds

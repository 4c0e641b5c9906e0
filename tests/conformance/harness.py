"""What the conformance harnesses share: the expected-failure file format and the `_cpu` case selection."""
from __future__ import annotations

import onnx.backend.test


def load_exclusions(path: str) -> dict[str, str]:
    """`test_name_cpu  # reason` lines -> {name: reason}; blank and `#` lines are headers."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, reason = line.partition("#")
            out[name.strip()] = reason.strip()
    return out


def cpu_cases(bt: onnx.backend.test.BackendTest) -> dict[str, type]:
    """The generated TestCase classes with only their `_cpu` methods (polyport's backends have no CUDA device)."""
    cases = bt.test_cases
    for cls in cases.values():
        for attr in [a for a in vars(cls) if a.startswith("test_") and not a.endswith("_cpu")]:
            delattr(cls, attr)
    return cases

"""Roofline latency estimate: a LOWER BOUND, never a prediction of measured time.

    latency >= max(flops / peak_flops(dtype), bytes / memory_bandwidth)

from the artifact's cost (runtime/cost.py, stored in the manifest under "cost")
and a DeviceSpec (devices.py). Nothing else is added: no kernel launch
overhead, no host work, no efficiency factor. A real run is slower; how much
slower is what the report shows next to measured rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from .. import errors
from ..devices import DeviceSpec
from .cost import evaluate


@dataclasses.dataclass(frozen=True)
class Estimate:
    device: str
    flops: int
    bytes: int
    compute_s: float
    memory_s: float

    @property
    def latency_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def total_flops(cost: Mapping[str, Any], bindings: Mapping[str, int]) -> int:
    return evaluate(cost["flops"], dict(bindings))


def total_bytes(cost: Mapping[str, Any], bindings: Mapping[str, int]) -> int:
    """Bytes moved: the `bytes` polynomial + for each MoE, the weights of the experts its tokens touch."""
    total = evaluate(cost["bytes"], dict(bindings))
    for m in cost.get("moe", ()):
        touched = touched_experts(int(m["experts"]), int(m["top_k"]), evaluate(m["tokens"], dict(bindings)))
        total += round(touched * int(m["expert_bytes"]))
    return total


def touched_experts(experts: int, top_k: int, tokens: int) -> float:
    """How many distinct experts `tokens` tokens read, each routed to `top_k` of `experts` uniformly: the
    expectation E (1 - (1 - k/E)^T). Exactly k for one token; 8 decode tokens of top-4 of 32 read ~21, not
    min(E, T k) = 32, which would credit a batched MoE step with bytes it never reads."""
    if tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def bind(cost: Mapping[str, Any], seq: int, symbols: Optional[list[str]] = None) -> dict[str, int]:
    """Bind every symbol of the cost (and `symbols`) to `seq`, as `polyport run --seq` does."""
    from ..ir.symbolic import SymExpr, parse
    names = set(symbols or ())
    for text in [cost["flops"], cost["bytes"]] + [m["tokens"] for m in cost.get("moe", ())]:
        d = parse(text)
        if isinstance(d, SymExpr):
            names |= d.symbols
    return {s: seq for s in names}


def estimate(cost: Optional[Mapping[str, Any]], device: DeviceSpec, bindings: Mapping[str, int],
             dtype: Optional[str] = None) -> Estimate:
    """The roofline lower bound for one run with `bindings` (e.g. {"seq": 128}) on `device`."""
    if not cost or "flops" not in cost:
        reason = f" ({cost['error']})" if cost and "error" in cost else ""
        raise errors.PolyportError(f"the artifact has no cost model{reason}: recompile it with this polyport "
                                   "to get roofline estimates")
    flops = total_flops(cost, bindings)
    nbytes = total_bytes(cost, bindings)
    peak = device.peak(dtype or cost.get("dtype", "f32"))
    return Estimate(device.name, flops, nbytes, flops / peak, nbytes / device.memory_bandwidth)

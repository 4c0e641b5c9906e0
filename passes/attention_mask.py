"""What an attention mask means, decided by running it (fuse-attention's mask analysis).

Exporters spell the causal / sliding-window mask as position arithmetic over
`seq` (Range, CumSum, GatherND, LessOrEqual, And, Where ...), and the spelling
changes with every transformers and torch release. A mask that depends on no
data input is a function of the sequence length alone, so instead of reading
its chain we run it on the reference executor at several lengths and compare
the keep-pattern with `visible(s, skv, causal, window)`, the Attention op's own
definition. Only an exact match becomes `causal` / `window`; anything else
(anti-causal, a bias such as ALiBi, a per-head pattern) is refused with a
reason. A mask that does depend on data (a padding mask) stays a mask operand, and so does
a position mask over keys that end in compressed entries (`seq // rate` of them).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ..ir.fused.attention import visible
from ..ir.graph import Value
from ..ir.ops import POLYPORT_DOMAIN
from ..ir.symbolic import SymExpr
from ..ir.types import TensorType
from .pattern import NoMatch
from .region import region_graph, region_nodes

BLOCKED = -1e4            # an additive entry at or below this hides its key (HF: finfo.min or -inf)
PROBE_SEQS = (1, 2, 3, 5, 8, 17, 40)
MAX_PROBE = 8192          # windows up to this size are found through the mask's own constants


@dataclasses.dataclass(frozen=True)
class MaskPart:
    """One mask the scores meet: "add" (float, added), "keep" (bool, True = visible) or "block" (bool)."""
    kind: str
    value: Value
    outer_scale: float = 1.0   # scale factors applied to the scores after this mask


@dataclasses.dataclass
class MaskMeaning:
    causal: int = 0
    window: int = 0
    operand: Optional[MaskPart] = None   # the data-dependent mask handed to Attention


def position_only(v: Value) -> bool:
    """Is `v` computed from constants and symbolic shapes alone (no graph input)?"""
    if v.const is not None:
        return True
    try:
        region_nodes([], v)
    except ValueError:
        return False
    return True


def analyse(parts: list[MaskPart], scores: Value, cache: Optional[dict] = None) -> MaskMeaning:
    """Turn the masks met on the way from the scores to the softmax into Attention's terms; raises NoMatch
    where Attention cannot express them.

    `cache` (one dict per pass run) shares the result between layers that read the same mask."""
    key = (tuple((p.kind, id(p.value), p.outer_scale) for p in parts), tuple(map(str, scores.shape[-2:])))
    if cache is not None and key in cache:
        found = cache[key]
    else:
        try:
            found = _analyse(parts, scores)
        except NoMatch as e:
            found = e
        if cache is not None:
            cache[key] = found
    if isinstance(found, NoMatch):
        raise NoMatch(str(found))
    return dataclasses.replace(found)


def _analyse(parts: list[MaskPart], scores: Value) -> MaskMeaning:
    data = [p for p in parts if not position_only(p.value)]
    positional = [p for p in parts if position_only(p.value)]
    meaning = MaskMeaning()
    if len(data) > 1:
        raise NoMatch(f"{len(data)} data-dependent masks (Attention takes one)")
    if data:
        part = data[0]
        if part.kind == "add" and part.outer_scale != 1.0:
            raise NoMatch(f"mask %{part.value.name} is scaled together with the scores")
        if part.kind == "add" and not (part.value.dtype and part.value.dtype.is_float):
            raise NoMatch(f"additive mask %{part.value.name} is not a float tensor")
        meaning.operand = part
    if not positional:
        return meaning
    if any(p.outer_scale <= 0 for p in positional):
        raise NoMatch("a position mask is scaled by a non-positive factor")
    try:
        meaning.causal, meaning.window = _causal_window(positional, scores)
    except NoMatch:
        if data or len(positional) != 1 or not _compressed_keys(scores) or positional[0].outer_scale != 1.0:
            raise
        # Keys that end in compressed entries (DeepSeek-V4's HCA: `seq // rate` pooled blocks after the
        # window): entry t is visible from query i when t < (i + 1) // rate, a pattern no band states.
        meaning.operand = positional[0]
    return meaning


def _compressed_keys(scores: Value) -> bool:
    """Does the key length hold a floor division (`seq + (seq // 8)`: compressed entries appended)?"""
    skv = scores.shape[-1] if scores.shape else None
    return isinstance(skv, SymExpr) and not skv.is_polynomial


def _causal_window(parts: list[MaskPart], scores: Value) -> tuple[int, int]:
    """(causal, window) that the position masks implement together; raises NoMatch otherwise."""
    runs = [_Runner(p) for p in parts]
    probes = sorted(set(PROBE_SEQS) | {c + d for r in runs for c in r.large_constants for d in (1, 2)})
    hypothesis: Optional[tuple[int, int]] = None
    for n in reversed(probes):          # the longest probe shows the window best
        keep = None
        for r in runs:
            k = r.keep(n, scores)
            keep = k if keep is None else keep & k
        s, skv = keep.shape
        if hypothesis is None:
            hypothesis = _guess(keep)
        want = visible(s, skv, bool(hypothesis[0]), hypothesis[1])
        if not np.array_equal(keep, want):
            rows = np.nonzero((keep != want).any(axis=1))[0]
            i = int(rows[0])
            raise NoMatch(f"position mask is not causal / sliding-window: at seq={n}, query {i} sees keys "
                             f"{np.nonzero(keep[i])[0].tolist()[:8]}")
    return hypothesis


def _guess(keep: np.ndarray) -> tuple[int, int]:
    if keep.all():
        return 0, 0
    last = int(keep[-1].sum())
    return 1, (0 if last == keep.shape[1] else last)


class _Runner:
    """The position-only mask region, runnable at any sequence length."""

    def __init__(self, part: MaskPart):
        from ..runtime.reference import ReferenceSession
        self.part = part
        self.graph = None if part.value.const is not None else region_graph([], part.value)
        self.session = ReferenceSession(self.graph) if self.graph is not None else None
        self.symbols: set[str] = set()
        self.large_constants: set[int] = set()
        for node in (self.graph.nodes if self.graph is not None else ()):
            for o in node.outputs:
                if isinstance(o.type, TensorType):
                    self.symbols |= o.type.symbols
            if node.domain == POLYPORT_DOMAIN and node.op_type == "ShapeValue":
                self.symbols |= {s for d in node.attrs["dims"] if hasattr(d, "symbols") for s in d.symbols}
        for c in (self.graph.constants.values() if self.graph is not None else ()):
            if c.const.size == 1 and c.const.dtype.kind in "iuf":
                x = float(c.const.reshape(()))
                if max(PROBE_SEQS) < abs(x) < MAX_PROBE and x == int(x):
                    self.large_constants.add(int(abs(x)))

    def keep(self, n: int, scores: Value) -> np.ndarray:
        """[s, skv] bool at seq length n, the same for every batch and head (else NoMatch)."""
        symbols = set(self.symbols) | set(scores.type.symbols)
        binding = {s: n for s in symbols}
        if self.session is None:
            arr = self.part.value.const
        else:
            arr = self.session.run({}, binding)[self.graph.outputs[0].name]
        arr = np.atleast_2d(np.asarray(arr))
        s, skv = (d.evaluate(binding) if hasattr(d, "evaluate") else arr.shape[i] if d is None else d
                  for i, d in zip((-2, -1), scores.shape[-2:]))
        if self.part.kind == "add":
            keep = arr > BLOCKED
            if np.any(arr[keep] != 0):
                raise NoMatch(f"position mask %{self.part.value.name} adds non-zero values to visible keys "
                                 f"(a bias, not a mask)")
        else:
            keep = arr.astype(bool) if self.part.kind == "keep" else ~arr.astype(bool)
        try:
            full = np.broadcast_to(keep, np.broadcast_shapes(keep.shape, (s, skv)))
        except ValueError:
            raise NoMatch(f"position mask %{self.part.value.name} {list(arr.shape)} does not broadcast to "
                             f"[{s}, {skv}]") from None
        flat = full.reshape(-1, s, skv)
        if not (flat == flat[0]).all():
            raise NoMatch(f"position mask %{self.part.value.name} differs across batch or heads")
        return flat[0]

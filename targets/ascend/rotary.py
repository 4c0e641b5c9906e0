"""Rotary -> CANN RotaryPositionEmbedding (mode half / interleave; a partial rotary slices around it)."""
from __future__ import annotations

from ...errors import PolyportError
from ...ir.graph import Node
from ...ir.ops import attrs_of
from .emission import CANN_DOMAIN, dims, lowers


# ---- Rotary -> RotaryPositionEmbedding -------------------------------------------------------
@lowers("Rotary")
def rotary(em, node: Node) -> None:
    x, cos, sin = node.inputs
    d = x.shape[-1]
    a = attrs_of(node)
    rd = a["rotary_dim"] or d
    mode = "interleave" if a["interleaved"] else "half"
    em.check(node, "RotaryPositionEmbedding", {"dtype": em.device_dtype(node, x, "RotaryPositionEmbedding"),
                                                 "head_dim": rd, "mode": mode})
    xn = em.get(x, em.compute)
    xs = dims(x.shape)
    c, s = em.get(cos, em.compute), em.get(sin, em.compute)
    if rd == d:
        em.emit("RotaryPositionEmbedding", [xn, c, s], [em.out(node.outputs[0], em.compute)],
                  {"mode": 0 if mode == "half" else 1}, CANN_DOMAIN)
        return
    if not isinstance(d, int):
        raise PolyportError(f"node {node.name}: partial rotary needs a static head dim, got {d}")
    axes = em.ints([-1], f"{node.name}_axes")
    rot = em.emit("Slice", [xn, em.ints([0], f"{node.name}_s0"), em.ints([rd], f"{node.name}_e0"), axes],
                    [(em.fresh(f"{node.name}_rot"), em.compute, xs[:-1] + [rd])],
                    note="partial rotary: rotated part")[0]
    rest = em.emit("Slice", [xn, em.ints([rd], f"{node.name}_s1"), em.ints([d], f"{node.name}_e1"), axes],
                     [(em.fresh(f"{node.name}_pass"), em.compute, xs[:-1] + [d - rd])],
                     note="partial rotary: pass-through part")[0]
    y = em.emit("RotaryPositionEmbedding", [rot, c, s],
                  [(em.fresh(f"{node.name}_roped"), em.compute, xs[:-1] + [rd])],
                  {"mode": 0 if mode == "half" else 1}, CANN_DOMAIN)[0]
    em.emit("Concat", [y, rest], [em.out(node.outputs[0], em.compute)], {"axis": -1})

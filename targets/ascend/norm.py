"""RMSNorm -> CANN RmsNorm."""
from __future__ import annotations

from ...ir.graph import Node
from .emission import CANN_DOMAIN, F32, dims, lowers


# ---- RMSNorm -> RmsNorm ----------------------------------------------------------------------
@lowers("RMSNorm")
def rms_norm(em, node: Node) -> None:
    x, w = node.inputs
    em.check(node, "RmsNorm", {"dtype": em.device_dtype(node, x, "RmsNorm")})
    xs = dims(x.shape)
    y = em.out(node.outputs[0], em.compute)
    rstd = (em.fresh(f"{node.name}_rstd"), F32, None if xs is None else xs[:-1] + [1])
    em.emit("RmsNorm", [em.get(x, em.compute), em.get(w, em.compute)], [y, rstd],
              {"epsilon": float(node.attrs["epsilon"])}, CANN_DOMAIN)

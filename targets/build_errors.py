"""A failure inside TVM after lowering is a compiler bug: report it as one line that names the node.

TVM legalizes each Relax call the lowering emitted into TIR, schedules and compiles it; an
exception there (a TVM bug, or a call the lowering should not have emitted) would surface
as a traceback from deep inside TVM. `naming_the_node` turns it into an UnsupportedOpError
naming the node whose call fails to legalize (found by legalizing the emitted calls one by
one, only once something failed), the target and the exception's first line.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

from .. import errors
from ..ir.graph import Node


@contextlib.contextmanager
def naming_the_node(lowered: Any, target_name: str):
    """`lowered`: the Lowered being built, or a list of them (the functions of one module)."""
    try:
        yield
    except errors.PolyportError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever TVM raised: one line, with the node
        node = failing_node([o for f in (lowered if isinstance(lowered, list) else [lowered]) for o in f.origins])
        where = f"node {node.name} ({node.qualified_op}): " if node is not None else ""
        text = str(e).strip().splitlines()
        raise errors.UnsupportedOpError(f"{where}the {target_name} target failed to build it: "
                                        f"{type(e).__name__}: {text[0] if text else ''}") from e


def failing_node(origins) -> Optional[Node]:
    """The first node one of whose emitted Relax calls raises in its legalization, if any."""
    import tvm
    from tvm import relax

    for call, node in origins:
        if node is None or not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            continue
        legalize = call.op.get_attr("FLegalize")
        if legalize is None:
            continue
        bb = relax.BlockBuilder()
        try:
            with bb.function("probe", []):
                legalize(bb, call)
                bb.emit_func_output(relax.const(0))
        except Exception:  # noqa: BLE001 - this call is the one that fails
            return node
    return None

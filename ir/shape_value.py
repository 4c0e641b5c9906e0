"""`polyport::ShapeValue`: a shape vector (or scalar) whose entries may be symbolic.

The frontend folds an exporter's shape arithmetic (Shape -> Gather -> Concat ...)
into one of these, e.g. `ShapeValue {dims=[1, seq, 4, 16]}`, so that the
consumer (Reshape, Expand, ...) sees its shape statically. At run time it
evaluates its dims with the symbols bound from the graph inputs.
"""
from __future__ import annotations

import numpy as np

from . import dtypes
from .ops import AttrSpec, define, infers, reference
from .types import TensorType

define("ShapeValue", inputs=(), outputs=("value",),
       attrs={"dims": AttrSpec(list, doc="ints and symbolic dims"),
              "scalar": AttrSpec(int, 0, doc="1: a 0-d value holding dims[0]")},
       doc="A 1-d (or 0-d) int64 tensor whose entries are symbolic dims.")


@infers("ShapeValue", domain="polyport")
def _infer(node, ctx):
    dims = node.attrs["dims"]
    return [TensorType(dtypes.I64, () if node.attrs.get("scalar") else (len(dims),))]


@reference("ShapeValue", domain="polyport")
def _run(node, inputs, ctx):
    vals = [d if isinstance(d, int) else d.evaluate(ctx.bindings) for d in node.attrs["dims"]]
    arr = np.array(vals, dtype=np.int64)
    return [arr.reshape(()) if node.attrs.get("scalar") else arr]

"""The numeric proof every fusion ends with: one tolerance per dtype, one failure type (NoMatch)."""
from __future__ import annotations

import numpy as np
import pytest

from polyport.ir import dtypes
from polyport.ir.graph import Graph
from polyport.ir.symbolic import sym
from polyport.ir.types import TensorType
from polyport.passes.pattern import NoMatch, Var, match, ops
from polyport.passes.region import equivalent, tolerance


@pytest.mark.parametrize("dtype,want", [(dtypes.F32, 1e-4), (dtypes.F16, 2e-2), (dtypes.BF16, 0.0625)])
def test_one_tolerance_per_dtype(dtype, want):
    assert tolerance(dtype) == pytest.approx(want)


def _square_norm(dtype):
    """x * rsqrt(mean(x^2) + eps) over the last axis, as a plain chain."""
    g = Graph("g")
    g.opset_imports[""] = 18
    t = TensorType(dtype, (sym("s"), 8))
    x = g.add_input("x", t)
    two = g.add_constant("two", np.array(2.0, dtype.numpy))
    eps = g.add_constant("eps", np.array(1e-6, dtype.numpy))
    axes = g.add_constant("axes", np.array([-1], np.int64))
    sq = g.make_node("Pow", [x, two], types=[t]).outputs[0]
    mean = g.make_node("ReduceMean", [sq, axes], types=[TensorType(dtype, (sym("s"), 1))]).outputs[0]
    den = g.make_node("Sqrt", [g.make_node("Add", [mean, eps], types=[mean.type]).outputs[0]],
                      types=[mean.type]).outputs[0]
    y = g.make_node("Div", [x, den], types=[t]).outputs[0]
    g.set_outputs([y])
    return g, x, y


def test_a_wrong_proposal_is_a_near_miss_with_its_reason():
    g, x, y = _square_norm(dtypes.F32)
    ones = g.add_constant("ones", np.ones(8, np.float32))
    equivalent([x], y, "RMSNorm", [x, ones], {"epsilon": 1e-6})           # the right proposal holds
    with pytest.raises(NoMatch, match=r"differs by .* tolerance 0.0001"):
        equivalent([x], y, "RMSNorm", [x, ones], {"epsilon": 1.0})        # a wrong epsilon does not


def test_half_precision_regions_use_their_dtype_tolerance():
    g, x, y = _square_norm(dtypes.F16)
    ones = g.add_constant("ones", np.ones(8, np.float16))
    equivalent([x], y, "RMSNorm", [x, ones], {"epsilon": 1e-6})
    with pytest.raises(NoMatch, match=r"tolerance 0.02"):
        equivalent([x], y, "RMSNorm", [x, ones], {"epsilon": 0.5})


def test_a_pattern_miss_raises_with_the_reason():
    g, x, y = _square_norm(dtypes.F32)
    assert match(ops.Div(Var("x"), ops.Sqrt(Var("d"))), y)["x"] is x
    with pytest.raises(NoMatch, match="Mul"):
        match(ops.Mul(Var("x"), Var("w")), y)

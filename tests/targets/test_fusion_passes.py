"""targets/fusion.py: neighbouring injective kernels become one, scheduled (opaque) kernels stay whole,
and a kernel taking a scalar (shape_to_tensor of a symbolic dim) stays out of fusion instead of
stopping the build in FuseTIR."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, tirx  # noqa: E402

from polyport.targets.fusion import legalize_and_fuse  # noqa: E402


def _kernels(mod) -> list[str]:
    return sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


def _fused(build) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    build(bb)
    return tvm.transform.Sequential(legalize_and_fuse())(bb.get())


def test_injective_chain_becomes_one_kernel():
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 8), "float32"))

    def build(bb):
        with bb.function("main", [x]):
            with bb.dataflow():
                t = bb.emit(relax.op.permute_dims(x, [1, 0]))
                r = bb.emit(relax.op.nn.relu(t))
                y = bb.emit_output(relax.op.add(r, r))
            bb.emit_func_output(y)

    mod = _fused(build)
    assert len(_kernels(mod)) == 1 and _kernels(mod)[0].startswith("fused_")
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    a = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(a)).numpy(), 2 * np.maximum(a.T, 0))


def test_opaque_kernel_is_left_whole():
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))

    def build(bb):
        func = tvm.te.create_prim_func([a := tvm.te.placeholder((4, 8), name="a"),
                                        tvm.te.compute((4, 8), lambda i, j: a[i, j] * 2, name="b")])
        gv = bb.add_func(func.with_attr("op_pattern", 8), "scheduled")
        with bb.function("main", [x]):
            with bb.dataflow():
                s = bb.emit(relax.call_tir(gv, [x], relax.TensorType((4, 8), "float32")))
                y = bb.emit_output(relax.op.nn.relu(s))
            bb.emit_func_output(y)

    kernels = _kernels(_fused(build))
    assert "scheduled" in kernels and len(kernels) == 2


def test_scalar_kernel_is_kept_out_of_fusion():
    """The derived programs' positions: shape_to_tensor of a symbolic dim, broadcast over the batch."""
    b = tirx.Var("b", "int64")
    s = tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType((b, s), "int64"))

    def build(bb):
        with bb.function("main", [x]):
            with bb.dataflow():
                pos = bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([s])))
                y = bb.emit_output(relax.op.broadcast_to(pos, relax.ShapeExpr([b])))
            bb.emit_func_output(y)

    mod = _fused(build)             # FuseTIR stopped with an InternalError here
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(np.zeros((3, 5), np.int64))).numpy()
    np.testing.assert_array_equal(out, [5, 5, 5])

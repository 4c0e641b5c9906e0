"""targets/fusion.py: neighbouring injective kernels become one, scheduled (opaque) kernels stay whole,
a kernel taking a scalar (shape_to_tensor of a symbolic dim) stays out of fusion instead of
stopping the build in FuseTIR, and reshape chains collapse before legalization. The cpu target then
inlines each fused kernel's intermediate blocks and vectorizes its inner loop (schedule_cpu.schedule_injective)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, tirx  # noqa: E402

from polyport.targets.fusion import legalize, legalize_and_fuse  # noqa: E402
from polyport.targets.schedule_cpu import _all_blocks, _sch, schedule_injective  # noqa: E402


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


def _blocks(func) -> list:
    return _all_blocks(_sch(func))


def test_fused_kernel_is_inlined_into_one_loop_nest():
    """FuseTIR leaves a loop nest and a scratch buffer per original op; on cpu they become one nest."""
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((1, n, 4, 6), "float32"))

    def build(bb):
        with bb.function("main", [x]):
            with bb.dataflow():
                t = bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
                a = bb.emit(relax.op.split(t, [4], axis=3))
                lo = bb.emit(relax.TupleGetItem(a, 0))
                hi = bb.emit(relax.TupleGetItem(a, 1))
                y = bb.emit_output(relax.op.concat([relax.op.negative(hi), lo], axis=3))
            bb.emit_func_output(y)

    fused = _fused(build)
    name, = [gv for gv, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(_blocks(fused[name])) > 1
    inlined = schedule_injective(fused)
    assert len(_blocks(inlined[name])) == 1
    a = np.random.default_rng(0).standard_normal((1, 5, 4, 6)).astype(np.float32)
    t = a.transpose(0, 2, 1, 3)
    want = np.concatenate([-t[..., 4:], t[..., :4]], axis=3)
    for mod in (fused, inlined):
        vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(a)).numpy(), want)


def test_injective_kernels_get_their_inner_loop_vectorized():
    """A fused chain and a lone transpose with a static inner extent of 16: the inner loop runs as vectors
    (same values); an inner extent that is symbolic is left a scalar loop."""
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 4, 16), "float32"))
    y = relax.Var("y", relax.TensorType((4, n), "float32"))

    def build(bb):
        with bb.function("main", [x, y]):
            with bb.dataflow():
                t = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
                a = bb.emit(relax.op.add(relax.op.nn.relu(t), t))
                b = bb.emit(relax.op.negative(y))
                out = bb.emit_output(relax.Tuple([a, b]))
            bb.emit_func_output(out)

    fused = _fused(build)
    done = schedule_injective(fused)

    def inner_kinds(mod):
        kinds = {}
        for gv, f in mod.functions_items():
            if isinstance(f, tirx.PrimFunc):
                sch = _sch(f)
                kinds[gv.name_hint] = [sch.get(sch.get_loops(blk)[-1]).kind for blk in _all_blocks(sch)]
        return kinds

    before, after = inner_kinds(fused), inner_kinds(done)
    assert all(k != tirx.ForKind.VECTORIZED for ks in before.values() for k in ks)
    vec = [name for name, ks in after.items() if ks == [tirx.ForKind.VECTORIZED]]
    assert len(vec) == 1 and vec[0].startswith("fused_")          # the [4, n, 16] chain
    assert [k for name, ks in after.items() if name not in vec for k in ks] == [tirx.ForKind.SERIAL]   # [4, n]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 4, 16)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    t = a.transpose(1, 0, 2)
    vm = relax.VirtualMachine(tvm.compile(done, target="llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b))
    np.testing.assert_array_equal(got[0].numpy(), np.maximum(t, 0) + t)
    np.testing.assert_array_equal(got[1].numpy(), -b)


def test_reshape_chain_collapses():
    """[n, 8] -> [1, n, 8] -> [n, 8] around a kernel, as the lowering writes it: no reshape is left."""
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 8), "float32"))

    def build(bb):
        with bb.function("main", [x]):
            with bb.dataflow():
                r = bb.emit(relax.op.reshape(relax.op.reshape(x, relax.ShapeExpr([1, n, 8])),
                                             relax.ShapeExpr([n, 8])))
                y = bb.emit_output(relax.op.nn.relu(r))
            bb.emit_func_output(y)

    bb = relax.BlockBuilder()
    build(bb)
    assert _kernels(tvm.transform.Sequential([relax.transform.LegalizeOps()])(bb.get())) == ["relu", "reshape", "reshape1"]
    assert _kernels(tvm.transform.Sequential(legalize())(bb.get())) == ["relu"]


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

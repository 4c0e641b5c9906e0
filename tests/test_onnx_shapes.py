"""Shape inference for standard ONNX ops: symbolic LLM patterns, and a cross-check with ONNX."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import polyport.ir.onnx_shapes  # noqa: F401  (registers the inference functions)
from polyport.errors import PolyportError
from polyport.ir import dtypes, ops
from polyport.ir.dtypes import BOOL, F32, I64
from polyport.ir.symbolic import dim_max, dim_min
from polyport.ir.graph import Graph
from polyport.ir.ops import InferContext
from polyport.ir.symbolic import sym
from polyport.ir.types import TensorType

seq, past, batch = sym("seq"), sym("past"), sym("batch")
INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass
class Ctx(InferContext):
    """Lets a test say what a non-constant input holds (a symbolic shape vector or scalar)."""
    values: dict = dataclasses.field(default_factory=dict)

    def value(self, v):
        if v is not None and v.name in self.values:
            return self.values[v.name]
        return super().value(v)


def dims(*ds, scalar=False):
    arr = np.empty(len(ds), dtype=object)
    for i, d in enumerate(ds):
        arr[i] = d
    return arr.reshape(()) if scalar else arr


def infer(node, opset=18, values=None):
    ctx = Ctx(opset=opset, values={k.name: v for k, v in (values or {}).items()})
    return list(ops.lookup("", node.op_type).infer(node, ctx))


def shape_of(node, opset=18, values=None, i=0):
    return infer(node, opset, values)[i].shape


def i64(*v):
    return np.array(v, np.int64)


@pytest.fixture
def g():
    return Graph()


# ---- LLM patterns with symbolic seq --------------------------------------------------

def test_reshape_into_heads_and_back(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 64)))
    heads = g.make_node("Reshape", [x, g.add_constant("s", i64(1, -1, 4, 16))])
    assert shape_of(heads) == (1, seq, 4, 16)
    y = g.add_input("y", TensorType(F32, (1, seq, 4, 16)))
    assert shape_of(g.make_node("Reshape", [y, g.add_constant("s2", i64(-1, 64))])) == (seq, 64)
    # A folded symbolic shape vector, as the frontend produces from Shape/Gather/Concat.
    sv = g.add_input("sv", TensorType(I64, (2,)))
    node = g.make_node("Reshape", [y, sv])
    assert shape_of(node, values={sv: dims(seq, 64)}) == (seq, 64)
    assert shape_of(node, values={sv: dims(seq, -1)}) == (seq, 64)


def test_reshape_zero_copies_and_cancels_unknown_dims(g):
    x = g.add_input("x", TensorType(F32, (None, seq, 4, 16)))
    node = g.make_node("Reshape", [x, g.add_constant("s", i64(0, 0, -1))])
    assert shape_of(node) == (None, seq, 64)
    x2 = g.add_input("x2", TensorType(F32, (batch, seq, 64)))
    assert shape_of(g.make_node("Reshape", [x2, g.add_constant("s2", i64(-1, 4, 16))])) == (batch * seq, 4, 16)


def test_reshape_unknown_shape_keeps_rank(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 64)))
    s = g.add_input("s", TensorType(I64, (3,)))
    assert shape_of(g.make_node("Reshape", [x, s])) == (None, None, None)


def test_reshape_that_cannot_apply_names_the_node(g):
    x = g.add_input("x", TensorType(F32, (2, 3)))
    node = g.make_node("Reshape", [x, g.add_constant("s", i64(4, -1))], name="bad_reshape")
    with pytest.raises(PolyportError, match=r"Reshape node 'bad_reshape'.*\[2, 3\]"):
        infer(node)
    node = g.make_node("Reshape", [x, g.add_constant("s2", i64(5, 2))], name="bad_count")
    with pytest.raises(PolyportError, match="bad_count"):
        infer(node)


def test_other_errors_name_node_and_dims(g):
    a = g.add_input("a", TensorType(F32, (seq, 64)))
    b = g.add_input("b", TensorType(F32, (32, 8)))
    with pytest.raises(PolyportError, match=r"MatMul node 'mm'.*\[seq, 64\].*\[32, 8\]"):
        infer(g.make_node("MatMul", [a, b], name="mm"))
    c = g.add_input("c", TensorType(F32, (1, seq, 64)))
    with pytest.raises(PolyportError, match="Concat node 'cat'.*ranks"):
        infer(g.make_node("Concat", [a, c], attrs={"axis": 0}, name="cat"))
    d = g.add_input("d", TensorType(F32, (2, 3)))
    e = g.add_input("e", TensorType(F32, (4, 3)))
    with pytest.raises(PolyportError, match="Add node 'add'"):
        infer(g.make_node("Add", [d, e], name="add"))
    f = g.add_input("f", TensorType(F32, (1, seq + 1)))
    with pytest.raises(PolyportError, match="Squeeze node 'sq'.*seq \\+ 1"):
        infer(g.make_node("Squeeze", [f, g.add_constant("ax", i64(1))], name="sq"), opset=13)


def test_transpose_heads(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 4, 16)))
    assert shape_of(g.make_node("Transpose", [x], attrs={"perm": [0, 2, 1, 3]})) == (1, 4, seq, 16)
    assert shape_of(g.make_node("Transpose", [x])) == (16, 4, seq, 1)


def test_range_over_seq(g):
    zero, one = g.add_constant("zero", np.array(0, np.int64)), g.add_constant("one", np.array(1, np.int64))
    limit = g.add_input("limit", TensorType(I64, ()))
    node = g.make_node("Range", [zero, limit, one])
    out = infer(node, values={limit: dims(seq, scalar=True)})[0]
    assert out == TensorType(I64, (seq,))
    start = g.add_input("start", TensorType(I64, ()))
    node = g.make_node("Range", [start, limit, one])
    assert shape_of(node, values={start: dims(past, scalar=True), limit: dims(past + seq, scalar=True)}) == (seq,)
    two = g.add_constant("two", np.array(2, np.int64))
    assert shape_of(g.make_node("Range", [zero, limit, two]), values={limit: dims(seq, scalar=True)}) \
        == ((seq + 1) // 2,)
    assert shape_of(g.make_node("Range", [one, limit, one]), values={limit: dims(seq, scalar=True)}) == (seq - 1,)


def test_expand_causal_mask(g):
    x = g.add_input("x", TensorType(BOOL, (1, 1, 1, seq)))
    s = g.add_input("s", TensorType(I64, (4,)))
    assert shape_of(g.make_node("Expand", [x, s]), values={s: dims(1, 1, seq, seq)}) == (1, 1, seq, seq)
    y = g.add_input("y", TensorType(F32, (seq, 1)))
    assert shape_of(g.make_node("Expand", [y, g.add_constant("c", i64(2, 1, 64))])) == (2, seq, 64)


def test_slice_symbolic(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 64)))

    def sl(starts, ends, axes, steps=None, src=x):
        ins = [src, g.add_constant("st", i64(*starts)), g.add_constant("en", i64(*ends)),
               g.add_constant("ax", i64(*axes))]
        if steps is not None:
            ins.append(g.add_constant("sp", i64(*steps)))
        return shape_of(g.make_node("Slice", ins))

    assert sl([0], [INT64_MAX], [1]) == (1, seq, 64)
    assert sl([1], [INT64_MAX], [1]) == (1, seq - 1, 64)
    assert sl([-1], [INT64_MAX], [1]) == (1, 1, 64)
    assert sl([0], [-1], [1]) == (1, seq - 1, 64)
    assert sl([0, 32], [INT64_MAX, 64], [1, 2]) == (1, seq, 32)
    assert sl([-1], [-INT64_MAX], [1], [-1]) == (1, seq, 64)        # reversal
    assert sl([2], [INT64_MAX], [1]) == (1, seq - dim_min(seq, 2), 64)  # seq may be < 2: max(seq - 2, 0)
    kv = g.add_input("kv", TensorType(F32, (1, past + seq, 64)))
    end = g.add_input("end", TensorType(I64, (1,)))
    node = g.make_node("Slice", [kv, g.add_constant("z", i64(0)), end, g.add_constant("a1", i64(1))])
    assert shape_of(node, values={end: dims(seq)}) == (1, seq, 64)
    cache = g.add_input("cache", TensorType(F32, (4096, 64)))
    node = g.make_node("Slice", [cache, g.add_constant("z2", i64(0)), end, g.add_constant("a0", i64(0))])
    assert shape_of(node, values={end: dims(seq)}) == (dim_min(seq, 4096), 64)  # seq <= 4096 is not provable


def test_gather_on_seq_axis_and_embedding(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 64)))
    last = g.make_node("Gather", [x, g.add_constant("i", np.array(-1, np.int64))], attrs={"axis": 1})
    assert shape_of(last) == (1, 64)
    emb = g.add_constant("emb", np.zeros((100, 8), np.float32))
    ids = g.add_input("ids", TensorType(I64, (1, seq)))
    assert infer(g.make_node("Gather", [emb, ids]))[0] == TensorType(F32, (1, seq, 8))


def test_concat_along_seq(g):
    a = g.add_input("a", TensorType(F32, (1, 4, past, 16)))
    b = g.add_input("b", TensorType(F32, (1, 4, seq, 16)))
    assert shape_of(g.make_node("Concat", [a, b], attrs={"axis": 2})) == (1, 4, past + seq, 16)
    c = g.add_input("c", TensorType(F32, (1, 4, None, 16)))
    assert shape_of(g.make_node("Concat", [a, c], attrs={"axis": -2})) == (1, 4, None, 16)


def test_matmul_batch_broadcast(g):
    q = g.add_input("q", TensorType(F32, (1, 4, seq, 16)))
    k = g.add_input("k", TensorType(F32, (1, 4, 16, seq)))
    assert shape_of(g.make_node("MatMul", [q, k])) == (1, 4, seq, seq)
    a = g.add_input("a", TensorType(F32, (2, 1, seq, 16)))
    w = g.add_input("w", TensorType(F32, (4, 16, 8)))
    assert shape_of(g.make_node("MatMul", [a, w])) == (2, 4, seq, 8)
    v = g.add_input("v", TensorType(F32, (16,)))
    assert shape_of(g.make_node("MatMul", [a, v])) == (2, 1, seq)
    assert shape_of(g.make_node("MatMul", [v, w])) == (4, 8)


def test_broadcast_rules(g):
    def add(s1, s2):
        return shape_of(g.make_node("Add", [g.add_input("a", TensorType(F32, s1)),
                                            g.add_input("b", TensorType(F32, s2))]))
    assert add((1, seq), (seq, 1)) == (seq, seq)
    assert add((seq,), (64,)) == (64,)           # seq must be 1 or 64
    assert add((seq,), (batch,)) == (None,)      # either may be 1
    assert add((seq,), (None,)) == (None,)
    assert add((64,), (None,)) == (64,)
    assert add((1,), (None,)) == (None,)
    assert add((seq + 1,), (seq,)) == (seq + 1,)  # seq + 1 >= 2, so seq must be 1


def test_where_broadcast(g):
    cond = g.add_input("cond", TensorType(BOOL, (1, 1, seq, seq)))
    x = g.add_input("x", TensorType(F32, ()))
    y = g.add_input("y", TensorType(F32, (1, 4, seq, seq)))
    assert infer(g.make_node("Where", [cond, x, y]))[0] == TensorType(F32, (1, 4, seq, seq))
    assert infer(g.make_node("Less", [cond, x]))[0].dtype == BOOL


def test_unsqueeze_squeeze_opset13_vs_11(g):
    x = g.add_input("x", TensorType(F32, (seq, 64)))
    assert shape_of(g.make_node("Unsqueeze", [x, g.add_constant("a", i64(0, -1))]), opset=13) == (1, seq, 64, 1)
    assert shape_of(g.make_node("Unsqueeze", [x], attrs={"axes": [1]}), opset=11) == (seq, 1, 64)
    y = g.add_input("y", TensorType(F32, (1, seq, 1)))
    assert shape_of(g.make_node("Squeeze", [y, g.add_constant("b", i64(-1))]), opset=13) == (1, seq)
    assert shape_of(g.make_node("Squeeze", [y], attrs={"axes": [0]}), opset=11) == (seq, 1)
    # Without axes every 1 goes; seq may be 1, so the rank is unknown.
    assert shape_of(g.make_node("Squeeze", [y]), opset=13) is None
    z = g.add_input("z", TensorType(F32, (1, 7, 1)))
    assert shape_of(g.make_node("Squeeze", [z]), opset=13) == (7,)


def test_topk_with_k_input(g):
    logits = g.add_input("logits", TensorType(F32, (1, seq, 8)))
    vals, idx = infer(g.make_node("TopK", [logits, g.add_constant("k", i64(2))], num_outputs=2))
    assert vals == TensorType(F32, (1, seq, 2)) and idx == TensorType(I64, (1, seq, 2))
    k = g.add_input("ks", TensorType(I64, (1,)))
    assert shape_of(g.make_node("TopK", [logits, k], attrs={"axis": 1}, num_outputs=2),
                    values={k: dims(seq)}) == (1, seq, 8)
    with pytest.raises(PolyportError, match="k = 9"):
        infer(g.make_node("TopK", [logits, g.add_constant("k9", i64(9))], num_outputs=2))


def test_reduce_keepdims(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 64)))
    ax = g.add_constant("ax", i64(-1))
    assert shape_of(g.make_node("ReduceMean", [x, ax])) == (1, seq, 1)
    assert shape_of(g.make_node("ReduceSum", [x, ax], attrs={"keepdims": 0}), opset=13) == (1, seq)
    assert shape_of(g.make_node("ReduceMax", [x], attrs={"axes": [1], "keepdims": 0}), opset=13) == (1, 64)
    assert shape_of(g.make_node("ReduceMax", [x], attrs={"keepdims": 0})) == ()
    assert shape_of(g.make_node("ReduceSum", [x], attrs={"noop_with_empty_axes": 1})) == (1, seq, 64)
    assert shape_of(g.make_node("ArgMax", [x], attrs={"axis": -1, "keepdims": 0})) == (1, seq)


def test_split_and_shape(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 128)))
    parts = infer(g.make_node("Split", [x, g.add_constant("s", i64(64, 64))], attrs={"axis": -1}, num_outputs=2))
    assert [p.shape for p in parts] == [(1, seq, 64)] * 2
    y = g.add_input("y", TensorType(F32, (2 * seq, 8)))
    parts = infer(g.make_node("Split", [y], attrs={"num_outputs": 2}, num_outputs=2))
    assert [p.shape for p in parts] == [(seq, 8)] * 2
    assert infer(g.make_node("Shape", [x]))[0] == TensorType(I64, (3,))


def test_attention_with_past(g):
    q = g.add_input("q", TensorType(F32, (batch, 8, seq, 64)))
    k = g.add_input("k", TensorType(F32, (batch, 2, seq, 64)))
    v = g.add_input("v", TensorType(F32, (batch, 2, seq, 32)))
    pk = g.add_input("pk", TensorType(F32, (batch, 2, past, 64)))
    pv = g.add_input("pv", TensorType(F32, (batch, 2, past, 32)))
    y, pres_k, pres_v = infer(g.make_node("Attention", [q, k, v, None, pk, pv], num_outputs=3), opset=23)
    assert y.shape == (batch, 8, seq, 32)
    assert pres_k.shape == (batch, 2, past + seq, 64) and pres_v.shape == (batch, 2, past + seq, 32)


def test_norms_keep_symbolic_shape(g):
    x = g.add_input("x", TensorType(F32, (1, seq, 64)))
    w = g.add_constant("w", np.ones(64, np.float32))
    y, mean, inv = infer(g.make_node("LayerNormalization", [x, w], num_outputs=3), opset=17)
    assert y.shape == (1, seq, 64) and mean == TensorType(F32, (1, seq, 1))
    assert infer(g.make_node("RMSNormalization", [x, w]), opset=23)[0] == TensorType(F32, (1, seq, 64))


# ---- cross-check against ONNX's own inference on static shapes ----------------------

def T(name, shape, dtype=np.float32):
    return (name, np.dtype(dtype), shape)


F, I = np.float32, np.int64
# (id, op, inputs, attrs, number of outputs, opset). Inputs: T(...) graph inputs, arrays are
# constants, None an omitted optional input.
CASES = [
    ("add", "Add", [T("a", (2, 1, 4)), T("b", (3, 1))], {}, 1, 18),
    ("pow", "Pow", [T("a", (2, 3)), T("b", (), I)], {}, 1, 18),
    ("equal", "Equal", [T("a", (2, 3), I), T("b", (3,), I)], {}, 1, 18),
    ("where", "Where", [T("c", (2, 1), bool), T("x", (1, 3)), T("y", (2, 3))], {}, 1, 18),
    ("cast", "Cast", [T("a", (2, 3))], {"to": onnx.TensorProto.FLOAT16}, 1, 19),
    ("sum", "Sum", [T("a", (3, 1)), T("b", (4,)), T("c", (1, 1))], {}, 1, 18),
    ("gelu", "Gelu", [T("a", (2, 3))], {}, 1, 20),
    ("isnan", "IsNaN", [T("a", (2, 3))], {}, 1, 20),
    ("dropout", "Dropout", [T("a", (2, 3))], {}, 2, 18),
    ("reshape", "Reshape", [T("a", (2, 3, 4)), i64(0, -1)], {}, 1, 18),
    ("transpose", "Transpose", [T("a", (2, 3, 4))], {"perm": [2, 0, 1]}, 1, 18),
    ("concat", "Concat", [T("a", (2, 3)), T("b", (2, 5))], {"axis": 1}, 1, 18),
    ("split", "Split", [T("a", (2, 3, 4)), i64(1, 2)], {"axis": 1}, 2, 18),
    ("split_num", "Split", [T("a", (2, 7))], {"axis": 1, "num_outputs": 3}, 3, 18),
    ("split_even", "Split", [T("a", (6, 2))], {}, 3, 13),
    ("gather", "Gather", [T("a", (3, 4, 5)), T("i", (2, 6), I)], {"axis": 1}, 1, 18),
    ("gather_el", "GatherElements", [T("a", (3, 4)), T("i", (3, 2), I)], {"axis": 1}, 1, 18),
    ("gather_nd", "GatherND", [T("a", (2, 3, 4)), T("i", (2, 5, 1), I)], {"batch_dims": 1}, 1, 18),
    ("scatter_nd", "ScatterND", [T("a", (4, 5)), T("i", (2, 1), I), T("u", (2, 5))], {}, 1, 18),
    ("slice", "Slice", [T("a", (10, 20)), i64(1, -5), i64(INT64_MAX, -1), i64(0, 1), i64(2, 1)], {}, 1, 18),
    ("slice_neg", "Slice", [T("a", (10, 20)), i64(8), i64(1), i64(1), i64(-3)], {}, 1, 18),
    ("squeeze", "Squeeze", [T("a", (3, 1, 4)), i64(1)], {}, 1, 13),
    ("squeeze11", "Squeeze", [T("a", (1, 3, 1))], {"axes": [0]}, 1, 11),
    ("unsqueeze", "Unsqueeze", [T("a", (3, 4)), i64(0, 3)], {}, 1, 13),
    ("flatten", "Flatten", [T("a", (2, 3, 4, 5))], {"axis": 2}, 1, 18),
    ("expand", "Expand", [T("a", (3, 1)), i64(2, 1, 4)], {}, 1, 18),
    ("tile", "Tile", [T("a", (2, 3)), i64(2, 3)], {}, 1, 18),
    ("pad", "Pad", [T("a", (3, 4)), i64(1, 0, 2, 3)], {}, 1, 18),
    ("pad_axes", "Pad", [T("a", (3, 4)), i64(1, 2), None, i64(1)], {}, 1, 18),
    ("shape", "Shape", [T("a", (2, 3, 4, 5))], {"start": 1, "end": -1}, 1, 18),
    ("size", "Size", [T("a", (2, 3))], {}, 1, 18),
    ("const_of_shape", "ConstantOfShape", [i64(2, 3)], {"value": np.array([1], np.int32)}, 1, 18),
    ("range", "Range", [np.array(1, I), np.array(10, I), np.array(3, I)], {}, 1, 18),
    ("range_f", "Range", [np.array(0.5, F), np.array(2.0, F), np.array(0.5, F)], {}, 1, 18),
    ("topk", "TopK", [T("a", (4, 10)), i64(3)], {"axis": 1}, 2, 18),
    ("reduce_sum", "ReduceSum", [T("a", (2, 3, 4)), i64(1)], {"keepdims": 0}, 1, 18),
    ("reduce_mean13", "ReduceMean", [T("a", (2, 3, 4))], {"axes": [0, 2]}, 1, 13),
    ("reduce_max_all", "ReduceMax", [T("a", (2, 3, 4))], {"keepdims": 0}, 1, 18),
    ("argmax", "ArgMax", [T("a", (2, 3, 4))], {"axis": 1, "keepdims": 0}, 1, 18),
    ("matmul", "MatMul", [T("a", (5, 1, 3, 4)), T("b", (2, 4, 6))], {}, 1, 18),
    ("matmul_1d", "MatMul", [T("a", (4,)), T("b", (3, 4, 6))], {}, 1, 18),
    ("matmul_int", "MatMulInteger", [T("a", (3, 4), np.uint8), T("b", (4, 2), np.uint8)], {}, 1, 18),
    ("gemm", "Gemm", [T("a", (4, 3)), T("b", (4, 5))], {"transA": 1}, 1, 18),
    ("einsum", "Einsum", [T("a", (2, 3, 4)), T("b", (2, 4, 5))], {"equation": "bij,bjk->bik"}, 1, 18),
    ("einsum_impl", "Einsum", [T("a", (3, 4)), T("b", (4, 5))], {"equation": "ij,jk"}, 1, 18),
    ("einsum_ell", "Einsum", [T("a", (7, 2, 3, 4))], {"equation": "...ij->...ji"}, 1, 18),
    ("layernorm", "LayerNormalization", [T("a", (2, 3, 4)), T("w", (3, 4))], {"axis": 1}, 3, 18),
    ("rmsnorm", "RMSNormalization", [T("a", (2, 3, 4)), T("w", (4,))], {}, 1, 23),
    ("batchnorm", "BatchNormalization", [T("a", (2, 3, 4, 4)), T("s", (3,)), T("b", (3,)), T("m", (3,)),
                                         T("v", (3,))], {}, 1, 15),
    ("instancenorm", "InstanceNormalization", [T("a", (2, 4, 5)), T("s", (4,)), T("b", (4,))],
     {}, 1, 18),
    ("conv", "Conv", [T("a", (1, 3, 17, 20)), T("w", (8, 3, 3, 5))],
     {"pads": [1, 2, 1, 2], "strides": [2, 3], "dilations": [1, 2]}, 1, 18),
    ("conv_same", "Conv", [T("a", (1, 4, 9, 9)), T("w", (6, 2, 3, 3))],
     {"auto_pad": "SAME_UPPER", "strides": [2, 2], "group": 2}, 1, 18),
    ("convT", "ConvTranspose", [T("a", (1, 4, 5, 6)), T("w", (4, 3, 3, 3))],
     {"strides": [2, 2], "pads": [1, 1, 0, 0], "output_padding": [1, 0]}, 1, 18),
    ("maxpool_ceil", "MaxPool", [T("a", (1, 2, 10, 11))], {"kernel_shape": [3, 3], "strides": [2, 2],
                                                          "ceil_mode": 1}, 2, 18),
    ("avgpool_same", "AveragePool", [T("a", (1, 2, 7, 8))], {"kernel_shape": [2, 2], "strides": [2, 3],
                                                           "auto_pad": "SAME_UPPER"}, 1, 18),
    ("global_pool", "GlobalAveragePool", [T("a", (2, 3, 5, 6))], {}, 1, 18),
    ("resize_scales", "Resize", [T("a", (1, 2, 3, 5)), None, np.array([1, 1, 2, 1.5], F)], {}, 1, 18),
    ("resize_sizes", "Resize", [T("a", (1, 2, 3, 5)), None, None, i64(1, 2, 6, 7)], {}, 1, 18),
    ("d2s", "DepthToSpace", [T("a", (1, 8, 2, 3))], {"blocksize": 2}, 1, 18),
    ("s2d", "SpaceToDepth", [T("a", (1, 2, 4, 6))], {"blocksize": 2}, 1, 18),
    ("onehot", "OneHot", [T("i", (2, 3), I), np.array(5, I), np.array([0, 1], F)], {"axis": 1}, 1, 18),
    ("nonzero", "NonZero", [T("a", (2, 3))], {}, 1, 18),
    ("trilu", "Trilu", [T("a", (3, 4))], {}, 1, 18),
    ("cumsum", "CumSum", [T("a", (3, 4)), np.array(1, I)], {}, 1, 18),
    ("castlike", "CastLike", [T("a", (3,)), T("b", (1,), I)], {}, 1, 18),
    ("eyelike", "EyeLike", [T("a", (3, 4))], {"dtype": onnx.TensorProto.INT32}, 1, 18),
    ("constant", "Constant", [], {"value_ints": [1, 2, 3]}, 1, 18),
    ("dequant", "DequantizeLinear", [T("a", (3, 4), np.int8), np.array(0.5, F)], {}, 1, 21),
    ("quant", "QuantizeLinear", [T("a", (3, 4)), np.array(0.5, F), np.array(1, np.int8)], {}, 1, 21),
    ("reshape_allowzero", "Reshape", [T("a", (2, 0, 3)), i64(0, 5)], {"allowzero": 1}, 1, 18),
    ("range_neg", "Range", [np.array(5, np.int32), np.array(1, np.int32), np.array(-2, np.int32)], {}, 1, 18),
    ("slice9", "Slice", [T("a", (5, 6))], {"starts": [1], "ends": [100], "axes": [1]}, 1, 9),
    ("pad_crop", "Pad", [T("a", (3, 4)), i64(-1, 0, 0, -2)], {}, 1, 18),
    ("convT_same", "ConvTranspose", [T("a", (1, 4, 5, 6)), T("w", (4, 3, 3, 3))],
     {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, 1, 18),
    ("attention_3d", "Attention", [T("q", (2, 5, 32)), T("k", (2, 7, 16)), T("v", (2, 7, 24)), None,
                                   T("pk", (2, 2, 3, 8)), T("pv", (2, 2, 3, 12))],
     {"q_num_heads": 4, "kv_num_heads": 2}, 4, 23),
]


def _onnx_types(op, inputs, attrs, n_out, opset):
    """Output types per ONNX's shape inference on the equivalent one-node model."""
    graph_inputs, inits, names = [], [], []
    for i, spec in enumerate(inputs):
        name = f"in{i}"
        if spec is None:
            names.append("")
        elif isinstance(spec, np.ndarray):
            inits.append(numpy_helper.from_array(spec, name))
            names.append(name)
        else:
            elem = helper.np_dtype_to_tensor_dtype(spec[1])
            graph_inputs.append(helper.make_tensor_value_info(name, elem, spec[2]))
            names.append(name)
    onnx_attrs = {k: numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, **onnx_attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    by_name = {vi.name: vi.type.tensor_type for vi in inferred.graph.value_info}
    result = []
    for o in outs:
        tt = by_name[o]
        shape = None if not tt.HasField("shape") else tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        result.append(TensorType(dtypes.from_onnx(tt.elem_type), shape))
    return result


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_onnx_inference(case):
    _, op, inputs, attrs, n_out, opset = case
    g = Graph()
    values = []
    for i, spec in enumerate(inputs):
        if spec is None:
            values.append(None)
        elif isinstance(spec, np.ndarray):
            values.append(g.add_constant(f"in{i}", spec))
        else:
            values.append(g.add_input(spec[0], TensorType(dtypes.from_numpy(spec[1]), spec[2])))
    node = g.make_node(op, values, attrs=attrs, num_outputs=n_out)
    ours = infer(node, opset)
    assert ours == _onnx_types(op, inputs, attrs, n_out, opset)


# ---- symbolic results hold for every value of the symbols (checked against onnxruntime) --

def _ort_session(node, inputs):
    ort = pytest.importorskip("onnxruntime")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_symbolic_slice_agrees_with_onnxruntime_for_all_seq():
    vec = [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, [1]) for n in ("s", "e", "a", "k")]
    sess = _ort_session(helper.make_node("Slice", ["x", "s", "e", "a", "k"], ["y"]),
                        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])] + vec)
    bounds = [0, 1, 2, -1, -3, seq, seq - 1, INT64_MAX, -INT64_MAX]
    decided = 0
    for d in (seq, seq + 2, 2 * seq, 4):
        x = Graph().add_input("x", TensorType(F32, (d,)))
        for st in bounds:
            for en in bounds:
                for step in (1, 2, -1, -2):
                    g = x.producer or Graph()
                    s, e = g.add_input("s", TensorType(I64, (1,))), g.add_input("e", TensorType(I64, (1,)))
                    node = g.make_node("Slice", [x, s, e, g.add_constant("a", i64(0)), g.add_constant("k", i64(step))])
                    got = shape_of(node, values={s: dims(st), e: dims(en)})[0]
                    if got is None or (en == INT64_MAX and step < 0):
                        continue  # onnxruntime reads that end as numpy's None; the spec clamps it to d - 1
                    decided += 1
                    for n in range(1, 6):
                        ev = [v.evaluate({"seq": n}) if hasattr(v, "evaluate") else v for v in (d, st, en, got)]
                        y = sess.run(None, {"x": np.zeros(ev[0], np.float32), "s": i64(ev[1]), "e": i64(ev[2]),
                                            "a": i64(0), "k": i64(step)})[0]
                        assert y.shape[0] == ev[3], (d, st, en, step, n, got)
    assert decided > 400  # most combinations are decided symbolically


def test_symbolic_range_matches_arange():
    g = Graph()
    start, limit = g.add_input("start", TensorType(I64, ())), g.add_input("limit", TensorType(I64, ()))
    for lo, hi, step in [(0, seq, 1), (seq, 2 * seq, 1), (past, past + seq, 1), (1, 2 * seq + 1, 2),
                         (seq, 0, -1), (0, seq - 1, 1), (3, seq, 1)]:
        node = g.make_node("Range", [start, limit, g.add_constant("d", np.array(step, np.int64))])
        got = shape_of(node, values={start: dims(lo, scalar=True), limit: dims(hi, scalar=True)})[0]
        for n in range(1, 6):
            env = {"seq": n, "past": n + 2}
            ev = [v.evaluate(env) if hasattr(v, "evaluate") else v for v in (lo, hi, got)]
            if got is not None:
                assert len(np.arange(ev[0], ev[1], step)) == ev[2], (lo, hi, step, n)
    # (3, seq): seq may be < 3, so the length is max(seq - 3, 0), not a polynomial.
    assert got == dim_max(seq, 3) - 3


def test_maxpool_ceil_mode_drops_window_starting_in_padding():
    # ONNX's C++ inference says 4 here; onnxruntime and the reference implementation give 3.
    g = Graph()
    x = g.add_input("x", TensorType(F32, (1, 1, 6)))
    attrs = {"kernel_shape": [2], "strides": [2], "pads": [0, 1], "ceil_mode": 1}
    assert shape_of(g.make_node("MaxPool", [x], attrs=attrs)) == (1, 1, 3)
    sess = _ort_session(helper.make_node("MaxPool", ["x"], ["y"], **attrs),
                        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 6])])
    assert sess.run(None, {"x": np.zeros((1, 1, 6), np.float32)})[0].shape == (1, 1, 3)

"""The cpu target end to end: ONNX -> fused IR -> Relax/TIR -> model.so -> Relax VM session.

One build per model serves every sequence length (seq is a symbolic tirx.Var).
Logits are compared with ONNX Runtime on the original export at seq 1, 7, 57
and 300: max |ours - ort| <= 1e-4 * max |ort logit| (fp32 throughout; the only
differences are summation order).

Two models (the bundled deepseek_v3_tiny and llama_a) run by default; the rest
of the corpus is marked `slow` (compiling all of them takes minutes on 2 cores).
Known gaps are strict xfails listed in tests/families.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import polyport.runtime.session as session
from polyport import errors
from polyport.compiler import compile_model
from polyport.runtime.artifact import ArtifactError

from .. import families

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CORPUS = json.loads((EXAMPLES / "models" / "corpus.json").read_text())["models"]

DEFAULT = ["deepseek_v3_tiny", "llama_a"]
SEQS = (1, 7, 57, 300)


def _model_path(name: str) -> Path:
    if name == "deepseek_v3_tiny":
        return EXAMPLES / "deepseek_v3_tiny.onnx"
    return EXAMPLES / "models" / CORPUS[name]["file"]


def _params():
    return families.params(["deepseek_v3_tiny"] + sorted(CORPUS), "cpu", default=DEFAULT,
                           raises=errors.UnsupportedOpError)


_ARTS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cpu_arts")


def _compiled(name: str, base: Path) -> Path:
    if name not in _ARTS:
        _ARTS[name] = compile_model(_model_path(name), ["cpu"], base / name, generation=False)   # run() only
    return _ARTS[name]


def _ids(seq: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, seq), dtype=np.int64)


@pytest.mark.parametrize("name", _params())
def test_matches_onnxruntime(name, art_dir):
    ort = pytest.importorskip("onnxruntime")
    path = _model_path(name)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])   # before TVM's pool (pinning)
    art = _compiled(name, art_dir)
    sess = session.load(art, "cpu")
    assert sess.input_names == ["input_ids"] and sess.output_names == ["logits"]
    vocab = int(json.loads((art / "manifest.json").read_text())["model"]["outputs"][0]["shape"][-1])
    for seq in SEQS:
        ids = _ids(seq, vocab, seq)
        want = ref.run(None, {"input_ids": ids})[0]
        got = sess.run({"input_ids": ids})["logits"]
        assert got.shape == want.shape, (seq, got.shape, want.shape)
        err = float(np.abs(got - want).max())
        assert err <= 1e-4 * float(np.abs(want).max()), f"{name} seq={seq}: max abs diff {err}"


def test_manifest_entry(art_dir):
    art = _compiled("llama_a", art_dir)
    m = json.loads((art / "manifest.json").read_text())
    e = m["targets"]["cpu"]
    assert e["mcpu"] and e["tvm_version"].startswith("0.27")
    assert "cpu/model.so" in m["files"] and "cpu/model.json" in m["files"]
    meta = json.loads((art / "cpu" / "model.json").read_text())
    assert meta["inputs"] == ["input_ids"] and meta["params"], meta


def test_no_generation_builds_main_only_and_generate_recomputes(art_dir, capfd):
    """compile --no-generation (what these tests use): no prefill / decode in the library, the manifest says
    why, and generate recomputes with one warning, giving the tokens of the greedy loop over run()."""
    art = _compiled("llama_a", art_dir)
    assert "functions" not in json.loads((art / "cpu" / "model.json").read_text())
    m = json.loads((art / "manifest.json").read_text())
    assert "programs" not in m["targets"]["cpu"] and not m["generation"]["layers"]
    assert "--no-generation" in m["generation"]["recompute"]
    sess = session.load(art, "cpu")
    capfd.readouterr()
    prompt = _ids(5, m["generation"]["vocab"], 3)
    got = sess.generate(prompt, 3)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-generation" in err[0] and "recomputes the whole sequence" in err[0], err
    seq = prompt
    for _ in range(3):
        seq = np.concatenate([seq, sess.run({"input_ids": seq})["logits"][:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(got, seq[:, 5:])


def _copy(art: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


def _flip_byte(p: Path, at: int) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0xFF
    p.write_bytes(bytes(data))


def test_tampered_weights_refused(art_dir, tmp_path):
    art = _copy(_compiled("llama_a", art_dir), tmp_path)
    w = art / "weights.safetensors"
    _flip_byte(w, w.stat().st_size - 5)
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        session.load(art, "cpu")


def test_tampered_library_refused(art_dir, tmp_path):
    art = _copy(_compiled("llama_a", art_dir), tmp_path)
    _flip_byte(art / "cpu" / "model.so", 1000)
    with pytest.raises(ArtifactError, match="cpu/model.so"):
        session.load(art, "cpu")


def test_unbuilt_target_is_a_clear_error(art_dir):
    art = _compiled("llama_a", art_dir)
    with pytest.raises(ArtifactError, match="target 'ascend' was not built into this artifact \\(built: cpu\\)"):
        session.load(art, "ascend")
    with pytest.raises(ArtifactError, match="target 'cuda' was not built into this artifact \\(built: cpu\\)"):
        session.load(art, "cuda")


def test_wrong_input_dtype(art_dir):
    sess = session.load(_compiled("llama_a", art_dir), "cpu")
    with pytest.raises(errors.InputError, match="dtype"):
        sess.run({"input_ids": np.zeros((1, 4), np.int32)})
    with pytest.raises(errors.InputError, match="rank"):
        sess.run({"input_ids": np.zeros((4,), np.int64)})


def test_unsupported_op_names_node_and_target():
    from polyport.ir import dtypes
    from polyport.ir.graph import Graph
    from polyport.ir.symbolic import sym
    from polyport.ir.types import TensorType
    from polyport.targets.tvm_lower import lower_to_relax

    g = Graph()
    x = g.add_input("x", TensorType(dtypes.F32, (1, sym("seq"))))
    n = g.make_node("Det", [x], name="det", types=[TensorType(dtypes.F32, ())])   # an op the cpu target does not lower
    g.set_outputs(n.outputs)
    with pytest.raises(errors.UnsupportedOpError, match=r"det.*Det.*cpu"):
        lower_to_relax(g, "cpu")


def test_floor_division_dims_compile(tmp_path):
    """Pooling windows of 4 tokens (DeepSeek-V4's compressor shape): `(seq // 4)` folds at import, the lowering
    maps it to tirx.floordiv, and one build serves lengths with and without a remainder (and with no window)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["n"], axis=0),
             helper.make_node("Div", ["n", "four"], ["windows"]),
             helper.make_node("Mul", ["windows", "four"], ["usable"]),
             helper.make_node("Slice", ["x", "zero", "usable", "one"], ["head"]),
             helper.make_node("Concat", ["batch", "windows", "four", "eight"], ["pooled_shape"], axis=0),
             helper.make_node("Reshape", ["head", "pooled_shape"], ["pooled"]),
             helper.make_node("ReduceSum", ["pooled", "two"], ["y"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [const("one", [1]), const("four", [4]), const("zero", [0]), const("two", [2]), const("batch", [1]),
         const("eight", [8])])
    path = tmp_path / "pool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    art = compile_model(path, ["cpu"], tmp_path / "pool.art")
    assert json.loads((art / "manifest.json").read_text())["model"]["outputs"][0]["shape"] == ["1", "(seq // 4)", "8"]
    sess = session.load(art, "cpu")
    for seq in (3, 8, 11):
        x = np.random.default_rng(seq).standard_normal((1, seq, 8)).astype(np.float32)
        want = x[:, : seq // 4 * 4].reshape(1, seq // 4, 4, 8).sum(2)
        np.testing.assert_allclose(sess.run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)


def _one_node_model(path: Path, nodes, inputs, outputs, initializers=()) -> Path:
    import onnx
    from onnx import helper
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


def test_per_head_matmul_binds_packed_weights_and_matches_numpy(tmp_path):
    """x [B, H, S, K] @ W [H, K, N] against a constant (MLA's absorbed products): W is bound packed per head
    ([H, N/NB, K, NB], model.json `packed`) for the per-head kernel; one build serves every B and S."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((3, 16, 48)).astype(np.float32)
    path = _one_node_model(tmp_path / "m.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "s", 16])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3, "s", 48])],
                           [numpy_helper.from_array(w, "w")])
    art = compile_model(path, ["cpu"], tmp_path / "art")
    assert json.loads((art / "cpu" / "model.json").read_text())["packed"] == {"w": 16}
    sess = session.load(art, "cpu")
    for b, s in [(1, 1), (2, 1), (2, 9)]:
        x = np.random.default_rng(s).standard_normal((b, 3, s, 16)).astype(np.float32)
        np.testing.assert_allclose(sess.run({"x": x})["y"], x @ w, rtol=1e-4, atol=1e-4)


def test_constant_of_shape_over_seq_builds_and_matches_onnxruntime(tmp_path):
    """ConstantOfShape([seq, 1]) (PhiMoE's router mask): TVM 0.27 legalizes R.full with a PrimType dtype
    and raised TypeError from topi.full; it is lowered as a broadcast of the constant instead."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    shape = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    path = _one_node_model(tmp_path / "m.onnx", [
        helper.make_node("Shape", ["x"], ["s"], end=1),
        helper.make_node("Constant", [], ["one"], value=shape),
        helper.make_node("Concat", ["s", "one"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["c"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [float("-inf")])),
        helper.make_node("Max", ["c", "x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", 1])])
    sess = session.load(compile_model(path, ["cpu"], tmp_path / "art"), "cpu")
    x = np.random.default_rng(0).standard_normal((5, 1)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(sess.run({"x": x})["y"], want)


def test_a_failure_inside_tvm_is_one_line_naming_the_node(tmp_path, monkeypatch):
    """An exception TVM raises after lowering (here: legalizing the all-true mask of a Dropout) is a compiler
    bug; compile reports it as one UnsupportedOpError naming the node, not a traceback from TVM."""
    from onnx import TensorProto, helper
    from tvm.relax.transform.legalize_ops import create

    def broken(*args, **kwargs):
        raise TypeError("argument of type 'PrimType' is not iterable")

    monkeypatch.setattr(create.topi, "full", broken)
    path = _one_node_model(tmp_path / "m.onnx", [helper.make_node("Dropout", ["x"], ["y", "mask"], name="drop")],
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 4])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", 4]),
                            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["seq", 4])])
    with pytest.raises(errors.UnsupportedOpError) as info:
        compile_model(path, ["cpu"], tmp_path / "art")
    assert str(info.value) == ("node drop (Dropout): the cpu target failed to build it: "
                               "TypeError: argument of type 'PrimType' is not iterable")
    assert not (tmp_path / "art").exists()

"""The `polyport` command line: inspect, run, and one-line errors for every bad input.

Models are built here with onnx.helper; outputs are checked against ONNX Runtime.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import polyport
from polyport.cli import seq_inputs

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _specs(model):
    """(name, type) of a model's inputs, as `seq_inputs` takes them."""
    return [(v.name, v.type) for v in polyport.import_onnx(model).inputs]


# ---- models ----------------------------------------------------------------------------
def _model(nodes, inputs, outputs, initializers=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def reshape_model() -> onnx.ModelProto:
    """x[1, seq, 8] -> Shape/Gather/Concat/Reshape -> Transpose -> Reshape(Shape(x)) -> MatMul(w[8, 4])."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Gather", ["x_shape", "one"], ["seq_len"], axis=0, name="gather"),
        helper.make_node("Constant", [], ["head"], value=numpy_helper.from_array(np.array([1, 2, 4], np.int64))),
        helper.make_node("Concat", ["head", "seq_len"], ["split_shape"], axis=0, name="concat"),
        helper.make_node("Reshape", ["x", "split_shape"], ["split"], name="reshape_split"),
        helper.make_node("Transpose", ["split"], ["moved"], perm=[0, 3, 1, 2], name="transpose"),
        helper.make_node("Reshape", ["moved", "x_shape"], ["merged"], name="reshape_merge"),
        helper.make_node("MatMul", ["merged", "w"], ["y"], name="matmul"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, [1, "seq", 8])],
                  [helper.make_tensor_value_info("y", F32, [1, "seq", 4])], [w])


def if_model() -> onnx.ModelProto:
    """Token ids -> embedding Gather -> If(sum > 0) {h * 2} else {-h}: an integer input and a subgraph."""
    emb = numpy_helper.from_array(np.random.default_rng(2).standard_normal((100, 8)).astype(np.float32), "emb")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    out_type = [1, "seq", 8]
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
         helper.make_node("Mul", ["h", "two"], ["doubled"], name="double")],
        "then", [], [helper.make_tensor_value_info("doubled", F32, out_type)])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["negated"], name="negate")],
        "else", [], [helper.make_tensor_value_info("negated", F32, out_type)])
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h"], axis=0, name="embed"),
        helper.make_node("ReduceSum", ["h"], ["total"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="greater"),
        helper.make_node("If", ["positive"], ["out"], then_branch=then_branch, else_branch=else_branch,
                         name="branch"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("ids", I64, [1, "seq"])],
                  [helper.make_tensor_value_info("out", F32, out_type)], [emb, zero])


def one_op_model(op_type: str, domain: str = "", node_name: str = "the_node", extra_opsets=()) -> onnx.ModelProto:
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain or None, name=node_name)
    return _model([node], [helper.make_tensor_value_info("x", F32, [1, "seq", 8])],
                  [helper.make_tensor_value_info("y", F32, [1, "seq", 8])], extra_opsets=extra_opsets)


def save(model: onnx.ModelProto, path, check: bool = True) -> str:
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def reshape_onnx(tmp_path):
    return save(reshape_model(), tmp_path / "reshape.onnx")


@pytest.fixture
def if_onnx(tmp_path):
    return save(if_model(), tmp_path / "if.onnx")


def npy(tmp_path, name: str, array) -> str:
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return str(path)


def onnxruntime_run(path: str, feeds: dict) -> dict:
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_user_error(result, *fragments: str) -> str:
    """Exit status 2, exactly one `polyport: error:` line on stderr naming each fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("polyport: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert "Traceback" not in result.stderr + result.stdout
    print(line)  # shown with `pytest -s`: the messages users see
    return line


# ---- inspect ---------------------------------------------------------------------------
def test_inspect_json(cli, reshape_onnx):
    result = cli("inspect", reshape_onnx, "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["inputs"] == [{"name": "x", "dtype": "f32", "shape": [1, "seq", 8]}]
    assert stats["outputs"] == [{"name": "y", "dtype": "f32", "shape": [1, "seq", 4]}]
    assert stats["symbols"] == ["seq"]
    # Shape -> Gather -> Concat folded into polyport::ShapeValue; no shape arithmetic left.
    assert stats["ops"] == {"Reshape": 2, "polyport::ShapeValue": 2, "MatMul": 1, "Transpose": 1}
    assert not {"Shape", "Gather", "Concat", "Constant"} & set(stats["ops"])
    assert stats["nodes"] == 6
    assert stats["parameters"] == 8 * 4
    assert stats["parameter_bytes"] == 8 * 4 * 4
    assert stats["opsets"] == {"ai.onnx": 18}


def test_inspect_text(cli, reshape_onnx):
    result = cli("inspect", reshape_onnx)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "  x  f32[1, seq, 8]" in out and "  y  f32[1, seq, 4]" in out
    assert "symbols     seq" in out
    assert "ai.onnx 18" in out
    assert "parameters  32 " in out
    # The op histogram closes the summary, most frequent first.
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("nodes       6 (4 op types)")) + 1
    assert [line.split() for line in lines[start:]] == [
        ["Reshape", "2"], ["polyport::ShapeValue", "2"], ["MatMul", "1"], ["Transpose", "1"]]
    assert result.stderr == ""


def test_inspect_counts_subgraph_ops(cli, if_onnx):
    stats = json.loads(cli("inspect", if_onnx, "--json").stdout)
    assert stats["ops"] == {"Gather": 1, "Greater": 1, "If": 1, "Mul": 1, "Neg": 1, "ReduceSum": 1}
    assert stats["nodes"] == 6
    # The embedding, the comparison's zero and the then-branch's constant 2.0 are float constants.
    assert stats["parameters"] == 100 * 8 + 1 + 1
    assert stats["inputs"] == [{"name": "ids", "dtype": "i64", "shape": [1, "seq"]}]


def test_inspect_dump_ir(cli, reshape_onnx, tmp_path):
    dump = tmp_path / "ir.txt"
    result = cli("inspect", reshape_onnx, "--dump-ir", dump)
    assert result.exit_code == 0, result.stderr
    text = dump.read_text()
    assert text.startswith("# ---- input\ngraph g(%x: f32[1, seq, 8])")
    assert "polyport::ShapeValue() {dims=[1, 2, 4, seq]" in text
    assert " Shape(" not in text and "Gather(" not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_version_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "polyport.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"polyport {polyport.__version__}"


# ---- run -------------------------------------------------------------------------------
def test_run_with_inputs_matches_onnxruntime(cli, reshape_onnx, tmp_path):
    x = np.random.default_rng(3).standard_normal((1, 5, 8)).astype(np.float32)
    out = tmp_path / "out.npz"
    result = cli("run", reshape_onnx, "--input", f"x={npy(tmp_path, 'x', x)}", "--output", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("y  f32[1, 5, 4]  min ")
    with np.load(out) as saved:
        assert sorted(saved.files) == ["y"]
        got = saved["y"]
    want = onnxruntime_run(reshape_onnx, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_run_seq_matches_onnxruntime(cli, if_onnx, tmp_path):
    out = tmp_path / "out.npz"
    result = cli("run", if_onnx, "--seq", "16", "--output", out)
    assert result.exit_code == 0, result.stderr
    assert "out  f32[1, 16, 8]" in result.stdout
    feeds = seq_inputs(_specs(if_onnx), 16)
    with np.load(out) as saved:
        got = saved["out"]
    np.testing.assert_allclose(got, onnxruntime_run(if_onnx, feeds)["out"], rtol=1e-5, atol=1e-5)


def test_seq_inputs_are_deterministic_token_ids_and_normal_floats(if_onnx, reshape_onnx):
    ids = seq_inputs(_specs(if_onnx), 16)["ids"]
    assert ids.dtype == np.int64 and ids.shape == (1, 16)
    assert ids.min() >= 0 and ids.max() < 100
    np.testing.assert_array_equal(ids, seq_inputs(_specs(if_onnx), 16)["ids"])
    x = seq_inputs(_specs(reshape_onnx), 3)["x"]
    assert x.dtype == np.float32 and x.shape == (1, 3, 8)
    np.testing.assert_array_equal(x, np.random.default_rng(0).standard_normal((1, 3, 8), dtype=np.float32))


def test_run_dump_ir_and_output_names(cli, reshape_onnx, tmp_path):
    dump, out = tmp_path / "run.ir", tmp_path / "o.npz"
    result = cli("run", reshape_onnx, "--seq", "2", "--dump-ir", dump, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "%y: f32[1, seq, 4] = MatMul" in dump.read_text()
    assert f"wrote {out}" in result.stdout


BUNDLED = Path(__file__).resolve().parents[1] / "examples" / "deepseek_v3_tiny.onnx"


def test_inspect_and_run_the_bundled_model(cli, tmp_path):
    """inspect, then run --seq 16 on the bundled model; logits match ONNX Runtime."""
    inspected = cli("inspect", BUNDLED, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    stats = json.loads(inspected.stdout)
    assert stats["inputs"] == [{"name": "input_ids", "dtype": "i64", "shape": [1, "seq"]}]
    assert "Shape" not in stats["ops"]
    out = tmp_path / "logits.npz"
    result = cli("run", BUNDLED, "--seq", "16", "--output", out)
    assert result.exit_code == 0, result.stderr
    feeds = seq_inputs(_specs(BUNDLED), 16)
    with np.load(out) as saved:
        got = saved["logits"]
    want = onnxruntime_run(str(BUNDLED), feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_inspect_and_run_after_the_default_pipeline(cli, tmp_path):
    """--passes default: fused ops in the histogram, the IR dumped after each pass, same logits."""
    dump = tmp_path / "ir.txt"
    inspected = cli("inspect", BUNDLED, "--passes", "default", "--json", "--dump-ir", dump)
    assert inspected.exit_code == 0, inspected.stderr
    ops = json.loads(inspected.stdout)["ops"]
    assert ops["polyport::Attention"] == 4 and ops["polyport::MoE"] == 3
    assert "TopK" not in ops and "Softmax" not in ops
    text = dump.read_text()
    assert text.startswith("# ---- input\n") and "# ---- after fuse-attention\n" in text
    out = tmp_path / "fused.npz"
    result = cli("run", BUNDLED, "--passes", "default", "--seq", "16", "--output", out)
    assert result.exit_code == 0, result.stderr
    want = onnxruntime_run(str(BUNDLED), seq_inputs(_specs(BUNDLED), 16))["logits"]
    with np.load(out) as saved:
        np.testing.assert_allclose(saved["logits"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_unknown_pipeline_is_a_one_line_error(cli):
    result = cli("inspect", BUNDLED, "--passes", "fastest")
    assert result.exit_code == 2 and "unknown pipeline 'fastest'" in result.stderr


# ---- bad model files -------------------------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "run"])
def test_missing_model_file(cli, tmp_path, command):
    missing = tmp_path / "nope.onnx"
    assert_user_error(cli(command, missing, "--seq", "4") if command == "run" else cli(command, missing),
                      str(missing), "no such file")


def test_truncated_model_file(cli, reshape_onnx, tmp_path):
    data = open(reshape_onnx, "rb").read()
    half = tmp_path / "half.onnx"
    half.write_bytes(data[: len(data) // 2])
    assert_user_error(cli("inspect", half), str(half))


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(600), b"hello, I am a text file\n", b""],
                         ids=["random-bytes", "text", "empty"])
def test_not_an_onnx_file(cli, tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert_user_error(cli("inspect", path), str(path))


def test_model_path_is_a_directory(cli, tmp_path):
    assert_user_error(cli("inspect", tmp_path), str(tmp_path))


def test_unknown_standard_op(cli, tmp_path):
    path = save(one_op_model("FooBar", node_name="foo_node"), tmp_path / "foobar.onnx", check=False)
    for args in (("inspect", path), ("run", path, "--seq", "3")):
        line = assert_user_error(cli(*args), "FooBar", "foo_node", "ai.onnx", "18")
        assert path in line


def test_unsupported_custom_domain_op(cli, tmp_path):
    model = one_op_model("FancyNorm", domain="com.example", node_name="norm0", extra_opsets=[("com.example", 3)])
    path = save(model, tmp_path / "custom.onnx", check=False)
    assert_user_error(cli("inspect", path), "FancyNorm", "norm0", "com.example")


def test_missing_external_data_file(cli, tmp_path):
    path = str(tmp_path / "ext.onnx")
    onnx.save(reshape_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    result = cli("inspect", path)                  # with the data file present: fine
    assert result.exit_code == 0, result.stderr
    os.remove(tmp_path / "w.bin")
    assert_user_error(cli("inspect", path), "w.bin", "missing")


def test_truncated_external_data_file(cli, tmp_path):
    path = str(tmp_path / "ext.onnx")
    onnx.save(reshape_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:10])
    assert_user_error(cli("inspect", path), "w.bin", "truncated")


# ---- bad inputs ------------------------------------------------------------------------
def test_wrong_input_name(cli, reshape_onnx, tmp_path):
    x = npy(tmp_path, "x", np.zeros((1, 3, 8), np.float32))
    assert_user_error(cli("run", reshape_onnx, "--input", f"input_ids={x}"), "input_ids", "'x'")


def test_wrong_input_dtype(cli, reshape_onnx, tmp_path):
    x = npy(tmp_path, "x", np.zeros((1, 3, 8), np.float64))
    assert_user_error(cli("run", reshape_onnx, "--input", f"x={x}"), "'x'", "f64", "f32")


def test_wrong_input_rank(cli, reshape_onnx, tmp_path):
    x = npy(tmp_path, "x", np.zeros((3, 8), np.float32))
    assert_user_error(cli("run", reshape_onnx, "--input", f"x={x}"), "'x'", "rank 2", "rank 3")


def test_wrong_static_dim(cli, reshape_onnx, tmp_path):
    x = npy(tmp_path, "x", np.zeros((1, 3, 7), np.float32))
    assert_user_error(cli("run", reshape_onnx, "--input", f"x={x}"), "'x'", "dim 2")


def test_missing_npy_file(cli, reshape_onnx, tmp_path):
    missing = tmp_path / "absent.npy"
    assert_user_error(cli("run", reshape_onnx, "--input", f"x={missing}"), str(missing), "no such file")


@pytest.mark.parametrize("kind,fragment", [("text", "not a .npy file"), ("truncated", "not a readable .npy"),
                                           ("pickle", "not a readable .npy")])
def test_unreadable_npy_file(cli, reshape_onnx, tmp_path, kind, fragment):
    bad = tmp_path / "bad.npy"
    if kind == "text":
        bad.write_text("1 2 3\n")
    elif kind == "truncated":
        data = open(npy(tmp_path, "good", np.zeros((1, 64, 8), np.float32)), "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    else:
        np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_user_error(cli("run", reshape_onnx, "--input", f"x={bad}"), f"--input x={bad}", fragment)


def test_npz_given_as_input(cli, reshape_onnx, tmp_path):
    archive = tmp_path / "x.npz"
    np.savez(archive, x=np.zeros((1, 2, 8), np.float32))
    assert_user_error(cli("run", reshape_onnx, "--input", f"x={archive}"), str(archive), ".npz")


@pytest.mark.parametrize("spec", ["x", "=a.npy", "x="])
def test_malformed_input_argument(cli, reshape_onnx, spec):
    assert_user_error(cli("run", reshape_onnx, "--input", spec), "--input", repr(spec), "'polyport run --help'")


def test_input_given_twice(cli, reshape_onnx, tmp_path):
    x = npy(tmp_path, "x", np.zeros((1, 3, 8), np.float32))
    assert_user_error(cli("run", reshape_onnx, "-i", f"x={x}", "-i", f"x={x}"), "'x'", "twice")


def test_no_inputs_given(cli, reshape_onnx):
    assert_user_error(cli("run", reshape_onnx), "--input", "--seq", "x")


def test_seq_and_input_together(cli, reshape_onnx, tmp_path):
    x = npy(tmp_path, "x", np.zeros((1, 3, 8), np.float32))
    assert_user_error(cli("run", reshape_onnx, "--seq", "3", "-i", f"x={x}"), "--seq", "--input")


@pytest.mark.parametrize("args,fragment", [
    (["run", "MODEL", "--seq", "0"], "--seq"),
    (["run", "MODEL", "--seq", "many"], "--seq"),
    (["inspect", "MODEL", "--frobnicate"], "--frobnicate"),
    (["inspect"], "MODEL"),
    (["compile", "MODEL"], "compile"),
], ids=["seq-zero", "seq-text", "unknown-option", "missing-argument", "unknown-command"])
def test_usage_errors(cli, reshape_onnx, args, fragment):
    assert_user_error(cli(*[reshape_onnx if a == "MODEL" else a for a in args]), fragment)


def test_output_directory_missing(cli, reshape_onnx, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.npz"
    assert_user_error(cli("run", reshape_onnx, "--seq", "2", "-o", out), str(out))


# ---- failures leave no files behind ----------------------------------------------------
def test_failed_run_keeps_previous_output(cli, reshape_onnx, tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"previous content")
    x = npy(tmp_path, "x", np.zeros((1, 3, 8), np.float64))      # wrong dtype: fails in the executor
    assert_user_error(cli("run", reshape_onnx, "--input", f"x={x}", "--output", out), "f64")
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz", "reshape.onnx", "x.npy"]


def test_failed_import_writes_no_ir_dump(cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert_user_error(cli("inspect", bad, "--dump-ir", tmp_path / "ir.txt"), str(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


# ---- --debug ---------------------------------------------------------------------------
def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    plain = subprocess.run([sys.executable, "-m", "polyport.cli", "inspect", str(bad)],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.startswith("polyport: error: ") and "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "polyport.cli", "--debug", "inspect", str(bad)],
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "ImportError_" in debug.stderr

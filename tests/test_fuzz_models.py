"""Fuzzed models: every mutated, truncated or corrupted ONNX file ends in one line naming what is wrong,
or in a run; never a traceback, a crash or a hang.

Cases (hypothesis) start from the corpus's llama_a export and mutate the
proto: wrong or negative dims, dangling or duplicated value names, cycles,
unknown dtypes, attributes of the wrong type, truncated or corrupted external
data, opsets out of range; or the file's bytes: truncation and byte flips.
Each case imports the file (frontend/onnx_import.py) and runs what imports on
the reference executor at seq 3, under a 20 s alarm. The counts by kind and
outcome are printed at the end of the module (`-s`).
"""
from __future__ import annotations

import collections
import signal
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyport import errors
from polyport.frontend.onnx_import import import_onnx
from polyport.runtime.reference import ReferenceSession

from .real_models import model_path

TIME_BOUND_S = 20
OUTCOMES: collections.Counter = collections.Counter()
BASE = onnx.load(str(model_path("llama_a")))
RAW = model_path("llama_a").read_bytes()


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nfuzzed models (kind, outcome): count")
    for (kind, outcome), n in sorted(OUTCOMES.items()):
        print(f"  {kind:<22} {outcome:<8} {n}")


def _mutate(kind: str, data: st.DataObject, folder: Path) -> Path:
    path = folder / "m.onnx"
    if kind in ("truncated file", "byte flips"):
        raw = bytearray(RAW)
        if kind == "truncated file":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 8))):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        path.write_bytes(bytes(raw))
        return path
    m = onnx.ModelProto()
    m.CopyFrom(BASE)
    g = m.graph
    nodes = list(g.node)
    node = nodes[data.draw(st.integers(0, len(nodes) - 1))]
    if kind == "wrong dims":
        dims = g.input[0].type.tensor_type.shape.dim if data.draw(st.booleans()) else None
        if dims is not None:
            dims[data.draw(st.integers(0, len(dims) - 1))].dim_value = data.draw(st.sampled_from([-3, 0, 7, 2**40]))
        else:
            init = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
            if init.dims:
                init.dims[data.draw(st.integers(0, len(init.dims) - 1))] = data.draw(st.sampled_from([-1, 0, 3]))
    elif kind == "dangling name":
        if node.input:
            node.input[data.draw(st.integers(0, len(node.input) - 1))] = "no_such_value"
    elif kind == "duplicated name":
        j = data.draw(st.integers(0, len(nodes) - 2))
        other = nodes[j if j < nodes.index(node) else j + 1]
        if node.output and other.output:
            node.output[0] = other.output[0]
    elif kind == "cycle":
        later = nodes[data.draw(st.integers(nodes.index(node), len(nodes) - 1))]
        if node.input and later.output:
            node.input[0] = later.output[0]
    elif kind == "unknown dtype":
        if data.draw(st.booleans()):
            g.input[0].type.tensor_type.elem_type = data.draw(st.sampled_from([0, 99, 1000]))
        else:
            g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))].data_type = data.draw(
                st.sampled_from([0, 99, 8]))
    elif kind == "wrong attribute type":
        if node.attribute:
            a = node.attribute[data.draw(st.integers(0, len(node.attribute) - 1))]
            new = data.draw(st.sampled_from(["string", "float", "ints", "int"]))
            name = a.name
            a.Clear()
            a.name = name
            if new == "string":
                a.type, a.s = onnx.AttributeProto.STRING, b"oops"
            elif new == "float":
                a.type, a.f = onnx.AttributeProto.FLOAT, 1.5
            elif new == "ints":
                a.type = onnx.AttributeProto.INTS
                a.ints.extend([1, -2])
            else:
                a.type, a.i = onnx.AttributeProto.INT, -7
    elif kind == "opset out of range":
        m.opset_import[0].version = data.draw(st.sampled_from([0, 1, 6, 99, 10**6]))
    elif kind == "external data":
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                  size_threshold=256)
        ext = folder / "w.bin"
        how = data.draw(st.sampled_from(["truncate", "delete", "flip", "escape"]))
        if how == "truncate":
            ext.write_bytes(ext.read_bytes()[: data.draw(st.integers(0, ext.stat().st_size - 1))])
        elif how == "delete":
            ext.unlink()
        elif how == "flip":
            raw = bytearray(ext.read_bytes())
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0xFF
            ext.write_bytes(bytes(raw))
        else:                                   # a location outside the model's folder
            m2 = onnx.load(str(path), load_external_data=False)
            for t in m2.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = "../../etc/passwd"
            onnx.save(m2, str(path))
        return path
    onnx.save(m, str(path))
    return path


def _case(kind: str, path: Path) -> str:
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(TIME_BOUND_S)
    try:
        graph = import_onnx(path)
        ReferenceSession(graph).run({graph.inputs[0].name: np.array([[1, 2, 3]], dtype=np.int64)}
                                    if graph.inputs else {})
        return "ran"
    except errors.PolyportError as e:
        message = str(e)
        assert message and "\n" not in message and "Traceback" not in message, message
        return "refused"
    except _Hang:
        pytest.fail(f"{kind}: no answer within {TIME_BOUND_S} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


KINDS = ["wrong dims", "dangling name", "duplicated name", "cycle", "unknown dtype", "wrong attribute type",
         "opset out of range", "external data", "truncated file", "byte flips"]


def _fuzz(data):
    kind = data.draw(st.sampled_from(KINDS))
    with tempfile.TemporaryDirectory() as d:
        path = _mutate(kind, data, Path(d))
        try:
            outcome = _case(kind, path)
        except Exception:
            OUTCOMES[(kind, "CRASH")] += 1
            raise
    OUTCOMES[(kind, outcome)] += 1


_FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
test_fuzzed_models = settings(max_examples=40, **_FUZZ)(given(data=st.data())(_fuzz))
test_fuzzed_models_long = pytest.mark.slow(settings(max_examples=400, **_FUZZ)(given(data=st.data())(_fuzz)))

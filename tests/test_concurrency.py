"""One session shared by many threads, the way a server's request threads share a model.

Every result must equal the same call made alone (and ONNX Runtime's), the
weights are uploaded once, and calls on the cpu target really overlap (no
global lock): each thread runs its own Relax VM over the shared library and
weight tensors. A bad feed is one InputError, and an interrupted call leaves
the session usable.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import polyport.runtime.session as session
from polyport import errors

from .real_models import assert_logits_close, model_path

VOCAB = 256
TOLERANCE = {"cpu": 1e-4, "ascend": 2e-2}    # ascend is emulated in fp16 (tests/targets/test_ascend.py says why)


def _ort():
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_path("llama_a")), so, providers=["CPUExecutionProvider"])


def _calls(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=(1, int(rng.integers(1, 81))), dtype=np.int64) for _ in range(n)]


def _server(sess, calls: list[np.ndarray], threads: int) -> list[np.ndarray]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda ids: sess.run({"input_ids": ids})["logits"], calls))


@pytest.mark.parametrize("target,calls", [("cpu", 64), ("ascend", 16)])
def test_threads_share_one_session(llama_artifact, target, calls):
    ref = _ort()
    sess = session.load(llama_artifact, target)
    inputs = _calls(calls, seed=1)
    got = _server(sess, inputs, threads=8)
    for ids, logits in zip(inputs, got):
        assert_logits_close(logits, ref.run(None, {"input_ids": ids})[0], rel=TOLERANCE[target])
        np.testing.assert_array_equal(logits, sess.run({"input_ids": ids})["logits"])   # equal to the call alone


@pytest.mark.slow
def test_server_8_threads_400_calls(llama_artifact):
    ref = _ort()
    sess = session.load(llama_artifact, "cpu")
    inputs = _calls(400, seed=2)
    for ids, logits in zip(inputs, _server(sess, inputs, threads=8)):
        assert_logits_close(logits, ref.run(None, {"input_ids": ids})[0])


def test_weights_uploaded_once(llama_artifact, monkeypatch):
    from polyport.runtime.cpu_session import CpuSession
    prepared = []
    real = CpuSession.prepare
    monkeypatch.setattr(CpuSession, "prepare", lambda self, n, w: prepared.append(n) or real(self, n, w))
    sess = session.load(llama_artifact, "cpu")
    loaded = len(prepared)
    assert loaded == len(sess.meta["params"]) > 0
    _server(sess, _calls(16), threads=4)
    assert len(prepared) == loaded


def test_calls_overlap(llama_artifact):
    """Two threads are inside the VM at the same time: nothing serialises `run`."""
    sess = session.load(llama_artifact, "cpu")
    both_inside = threading.Barrier(2, timeout=30)
    real = sess._function

    def function(name):
        fn = real(name)

        def call(*args):
            both_inside.wait()          # raises BrokenBarrierError if the other call cannot get in
            return fn(*args)
        return call
    sess._function = function
    ids = _calls(2)
    _server(sess, ids, threads=2)


@pytest.mark.parametrize("target", ["cpu", "ascend"])
@pytest.mark.parametrize("feeds,says", [
    (None, "feeds must be a mapping"),
    ([np.zeros((1, 3), np.int64)], "feeds must be a mapping"),
    ({"input_ids": [[1, 2]]}, "expected a NumPy array"),
    ({"input_ids": None}, "expected a NumPy array"),
    ({0: np.zeros((1, 3), np.int64)}, "unknown input 0"),
    ({}, "missing input 'input_ids'"),
    ({"input_ids": np.zeros((1, 3), np.float32)}, "dtype f32 given"),
    ({"input_ids": np.zeros(3, np.int64)}, "rank 1"),
])
def test_bad_feeds_are_one_input_error(llama_artifact, target, feeds, says):
    sess = session.load(llama_artifact, target)
    with pytest.raises(errors.InputError, match=says):
        sess.run(feeds)


def test_reference_rejects_non_mapping_feeds():
    from polyport.frontend.onnx_import import import_onnx
    from polyport.runtime.reference import ReferenceSession
    with pytest.raises(errors.InputError, match="feeds must be a mapping"):
        ReferenceSession(import_onnx(model_path("llama_a"))).run(None)


def test_interrupted_run_leaves_session_usable(llama_artifact):
    sess = session.load(llama_artifact, "cpu")
    ids = _calls(1)[0]
    want = sess.run({"input_ids": ids})["logits"]
    real = sess._function

    def interrupted(name):
        fn = real(name)

        def call(*args):
            fn(*args)                   # the VM was mid-use when Ctrl-C arrived
            raise KeyboardInterrupt
        return call
    sess._function = interrupted
    with pytest.raises(KeyboardInterrupt):
        sess.run({"input_ids": ids})
    del sess._function
    np.testing.assert_array_equal(sess.run({"input_ids": ids})["logits"], want)

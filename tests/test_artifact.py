"""The artifact directory: atomic writes, hash checks, safetensors weights."""
import json
import os
import signal

import ml_dtypes
import numpy as np
import pytest

from polyport.runtime import safetensors
from polyport.runtime.artifact import Artifact, ArtifactError, ArtifactWriter

SIG = {"name": "m", "inputs": [{"name": "x", "dtype": "f32", "shape": ["seq", "4"]}], "outputs": [], "symbols": ["seq"]}


def _write(path, weights=None, target="cpu", payload=b"code"):
    with ArtifactWriter(path, SIG) as w:
        w.write_weights(weights or {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
        (w.target_dir(target) / "model.bin").write_bytes(payload)
        w.add_target(target, {"arch": "test"})
        return w.commit()


def test_roundtrip_and_manifest(tmp_path):
    art = Artifact(_write(tmp_path / "art"))
    assert art.targets == ["cpu"] and art.signature == SIG
    art.verify("cpu")
    np.testing.assert_array_equal(art.weights()["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    files = json.loads((tmp_path / "art" / "manifest.json").read_text())["files"]
    assert set(files) == {"weights.safetensors", "cpu/model.bin"}


def test_targets_accumulate_in_one_artifact(tmp_path):
    _write(tmp_path / "art", target="cpu")
    _write(tmp_path / "art", target="ascend")
    art = Artifact(tmp_path / "art")
    assert art.targets == ["ascend", "cpu"]
    art.verify()


def test_failed_write_leaves_previous_artifact_and_no_temp_dir(tmp_path):
    _write(tmp_path / "art", payload=b"v1")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "art", SIG) as w:
            (w.target_dir("cpu") / "model.bin").write_bytes(b"half")
            raise RuntimeError("lowering failed")
    assert (tmp_path / "art" / "cpu" / "model.bin").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_ctrl_c_between_the_renames_waits_for_the_second(tmp_path, monkeypatch, request):
    """SIGINT after the old artifact is moved aside: the new one still lands, then KeyboardInterrupt is raised."""
    _write(tmp_path / "art", payload=b"v1")
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(f".old-{os.getpid()}"):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr("polyport.runtime.artifact.os.replace", replace_then_interrupt)
    # Python's own handler, whatever an earlier test in this process left (held() hands the signal back to it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path / "art", payload=b"v2")
    Artifact(tmp_path / "art").verify()
    assert (tmp_path / "art" / "cpu" / "model.bin").read_bytes() == b"v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_tampered_or_truncated_file_is_refused(tmp_path):
    path = _write(tmp_path / "art")
    (path / "cpu" / "model.bin").write_bytes(b"evil")
    with pytest.raises(ArtifactError, match="cpu/model.bin does not match its hash"):
        Artifact(path).verify("cpu")
    path = _write(tmp_path / "art2")
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        Artifact(path).verify()


def test_unbuilt_target_and_non_artifact(tmp_path):
    path = _write(tmp_path / "art")
    with pytest.raises(ArtifactError, match="target 'cuda' was not built into this artifact \\(built: cpu\\)"):
        Artifact(path).target_entry("cuda")
    with pytest.raises(ArtifactError, match="not a polyport artifact"):
        Artifact(tmp_path)


def test_safetensors_is_memory_mapped_and_aligned(tmp_path):
    tensors = {"a": np.ones((3, 5), np.float32), "b": np.ones(7, ml_dtypes.bfloat16), "c": np.zeros((0, 2), np.int64)}
    with open(tmp_path / "w.st", "wb") as f:
        safetensors.save(tensors, f)
    back = safetensors.load(tmp_path / "w.st")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert isinstance(back["a"], np.memmap) and back["a"].ctypes.data % 64 == 0
    raw = (tmp_path / "w.st").read_bytes()
    (tmp_path / "cut.st").write_bytes(raw[: len(raw) - 8])
    with pytest.raises(safetensors.SafetensorsError, match="runs past the end"):
        safetensors.load(tmp_path / "cut.st")

"""Artifacts that were tampered with, truncated, swapped or fuzzed are refused with one line, before loading.

The trust model (README): an artifact carries native code and loading it runs
that code, so only artifacts from a trusted source should be loaded; the
hashes in the manifest detect corruption, not an attacker (who can rewrite
them). What loading does guarantee: it never opens a file outside the
artifact directory, and nothing malformed ends in a traceback or a crash.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyport.runtime.session as session
from polyport import errors
from polyport.runtime import safetensors
from polyport.runtime.artifact import sha256


@pytest.fixture
def art(llama_artifact, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(llama_artifact, dst)
    return dst


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _save(art: Path, m: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(m))


def _rehash(art: Path, rel: str) -> None:
    m = _manifest(art)
    m["files"][rel] = sha256(art / rel)
    _save(art, m)


def _refused(art: Path, target: str, says: str, case: str) -> None:
    with pytest.raises(errors.PolyportError) as e:
        session.load(art, target)
    message = str(e.value)
    assert "\n" not in message and says in message, message
    print(f"refused ({case}): {message}")


@pytest.mark.parametrize("path", ["../x.so", "/tmp/x.so", "cpu/../../x.so"])
def test_library_outside_the_artifact(art, path):
    shutil.copy(art / "cpu" / "model.so", art.parent / "x.so")
    m = _manifest(art)
    m["targets"]["cpu"]["library"] = path
    m["files"][path] = m["files"].pop("cpu/model.so")
    _save(art, m)
    _refused(art, "cpu", f"the manifest names {path!r}, outside the artifact directory", f"library {path}")


def test_symlink_leaving_the_artifact(art):
    outside = art.parent / "evil.so"
    shutil.copy(art / "cpu" / "model.so", outside)          # same bytes: the hash alone would pass it
    (art / "cpu" / "model.so").unlink()
    (art / "cpu" / "model.so").symlink_to(outside)
    _refused(art, "cpu", "cpu/model.so is a link leading outside the artifact directory", "symlinked library")


def test_library_not_hashed(art):
    m = _manifest(art)
    del m["files"]["cpu/model.so"]
    _save(art, m)
    _refused(art, "cpu", "target cpu loads 'cpu/model.so', which the manifest does not hash", "unhashed library")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(art, version):
    m = _manifest(art)
    m["format_version"] = version
    _save(art, m)
    _refused(art, "cpu", f"artifact format version {version!r}; this polyport reads 1", f"format version {version!r}")


def test_truncated_library(art):
    lib = art / "cpu" / "model.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])
    _refused(art, "cpu", "cpu/model.so does not match its hash", "truncated library")
    _rehash(art, "cpu/model.so")                                # re-hashed: the loader itself refuses it
    _refused(art, "cpu", "cannot load cpu/model.so", "truncated library, re-hashed")


def _rewrite_weights(art: Path, change) -> None:
    tensors = {n: np.array(w) for n, w in safetensors.load(art / "weights.safetensors").items()}
    change(tensors)
    with open(art / "weights.safetensors", "wb") as f:
        safetensors.save(tensors, f)
    _rehash(art, "weights.safetensors")


def test_swapped_weights(art):
    """(ascend's weights live in its hashed ascend/weights.bin: it never reads weights.safetensors)"""
    def swap(t):
        a, b = [n for n, w in t.items() if w.ndim == 2 and w.shape[0] != w.shape[1]][:2]
        t[a], t[b] = t[b], t[a]
    _rewrite_weights(art, swap)
    _refused(art, "cpu", "the compiled model expects", "swapped weights")


def test_weight_shapes_disagree(art):
    def transpose(t):
        name = next(n for n, w in t.items() if w.ndim == 2 and w.shape[0] != w.shape[1])
        t[name] = np.ascontiguousarray(t[name].T)
    _rewrite_weights(art, transpose)
    _refused(art, "cpu", "the compiled model expects", "transposed weight")


def test_missing_weight(art):
    _rewrite_weights(art, lambda t: t.pop(next(iter(t))))
    _refused(art, "cpu", "as nothing", "missing weight")


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=6)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _fuzz_manifest(llama_artifact, tmp_path_factory, data):
    """Any value of the manifest replaced (or deleted) by random JSON: a clean load or one PolyportError."""
    art = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(llama_artifact, art)
    m = _manifest(art)
    where = data.draw(st.sampled_from([p for p in _paths(m) if p][:400]))
    parent = m
    for k in where[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()):
        parent[where[-1]] = data.draw(_JSON)
    elif isinstance(parent, dict):
        del parent[where[-1]]
    _save(art, m)
    target = data.draw(st.sampled_from(["cpu", "ascend"]))
    try:
        s = session.load(art, target)
        s.run({"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})
    except errors.PolyportError as e:
        assert "\n" not in str(e)


_FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck))
test_fuzzed_manifest = settings(max_examples=25, **_FUZZ)(given(data=st.data())(_fuzz_manifest))
test_fuzzed_manifest_long = pytest.mark.slow(settings(max_examples=300, **_FUZZ)(given(data=st.data())(_fuzz_manifest)))

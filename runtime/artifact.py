"""The deployable artifact: a directory every target shares.

    ART/manifest.json         format version, model signature (symbolic dims as text),
                              per-target entries (archs: the architectures built, a list
                              in every target; toolchain), file hashes
    ART/weights.safetensors   the weights, shared by all targets
    ART/<target>/...          what each target's lowering wrote

Writing is atomic: everything goes into a sibling temporary directory that is
renamed into place only when complete, so a failed compile never leaves a
half-written artifact. Reading checks every hash the manifest lists for the
files it is about to use and refuses a tampered or truncated artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .. import __version__, errors
from . import safetensors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class ArtifactError(errors.PolyportError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactWriter:
    """Build an artifact in a temporary directory; `commit()` moves it into place.

    With an existing artifact at `path`, its weights and other targets' folders
    are carried over, so targets can be added one compile at a time."""

    def __init__(self, path: str | os.PathLike, signature: Mapping[str, Any]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self.manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "polyport_version": __version__,
                                         "model": dict(signature), "targets": {}, "files": {}}
        if (self.path / MANIFEST).exists():
            old = read_manifest(self.path)
            if old["model"] == self.manifest["model"]:
                for name in old["targets"]:
                    shutil.copytree(self.path / name, self.tmp / name)
                    self.manifest["targets"][name] = old["targets"][name]
                if (self.path / WEIGHTS).exists():
                    shutil.copy2(self.path / WEIGHTS, self.tmp / WEIGHTS)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        with open(self.tmp / WEIGHTS, "wb") as f:
            safetensors.save(tensors, f, {"producer": f"polyport {__version__}"})

    def target_dir(self, target: str) -> Path:
        d = self.tmp / target
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        return d

    def add_target(self, target: str, entry: Mapping[str, Any]) -> None:
        self.manifest["targets"][target] = dict(entry)

    def commit(self) -> Path:
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(self.tmp).as_posix()] = sha256(p)
        self.manifest["files"] = files
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(self.manifest, f, indent=2, sort_keys=True)
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path}: not a polyport artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: unreadable manifest ({e})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{mf}: artifact format version {version!r}; this polyport reads {FORMAT_VERSION}")
    return manifest


class Artifact:
    """A read-only view of an artifact directory, verified per target on use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    @property
    def targets(self) -> list[str]:
        return sorted(self.manifest["targets"])

    @property
    def signature(self) -> dict[str, Any]:
        return self.manifest["model"]

    def target_entry(self, target: str) -> dict[str, Any]:
        if target not in self.manifest["targets"]:
            built = ", ".join(self.targets) or "none"
            raise ArtifactError(f"{self.path}: target {target!r} was not built into this artifact "
                                f"(built: {built}); run `polyport compile MODEL --target {target} -o {self.path}`")
        return self.manifest["targets"][target]

    def verify(self, target: Optional[str] = None) -> None:
        """Check the hashes of the shared files and of `target`'s folder (all files if None)."""
        for rel, digest in self.manifest["files"].items():
            top = rel.split("/", 1)[0]
            if target is not None and "/" in rel and top != target:
                continue
            p = self.path / rel
            if not p.is_file():
                raise ArtifactError(f"{self.path}: file {rel} listed in the manifest is missing")
            if sha256(p) != digest:
                raise ArtifactError(f"{self.path}: file {rel} does not match its hash in the manifest "
                                    "(tampered with or truncated); recompile the artifact")

    def weights(self) -> dict[str, np.ndarray]:
        try:
            return safetensors.load(self.path / WEIGHTS)
        except safetensors.SafetensorsError as e:
            raise ArtifactError(str(e)) from None

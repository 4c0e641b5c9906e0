"""The deployable artifact: a directory every target shares.

    ART/manifest.json         format version, model signature (symbolic dims as text),
                              per-target entries (archs: the architectures built, a list
                              in every target; toolchain), file hashes
    ART/weights.safetensors   the weights, shared by all targets
    ART/<target>/...          what each target's lowering wrote

Writing is atomic: everything goes into a sibling temporary directory that is
renamed into place only when complete, so a failed compile never leaves a
half-written artifact, and a directory that is not an artifact is never
replaced. Reading checks every hash the manifest lists for the
files it is about to use and refuses a tampered or truncated artifact.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from .. import __version__, errors, files, interrupts
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


def check_output(path: str | os.PathLike) -> Path:
    """The absolute artifact path for `-o path`, refused (one line, before any work) when writing it would
    lose data (an existing directory that is not an artifact) or cannot succeed."""
    shown = os.fspath(path)
    path = Path(os.path.abspath(path))
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents:
        raise ArtifactError(f"cannot write {shown}: it is the current directory (or holds it); "
                            "name a new directory for the artifact, e.g. -o ART")
    files.check_writable(shown, directory_ok=True)
    if path.is_dir() and not (path / MANIFEST).is_file() and any(path.iterdir()):
        raise ArtifactError(f"{shown} exists and is not a polyport artifact (no {MANIFEST}); refusing to replace "
                            "it: choose another -o directory, or remove it")
    return path


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` (flock), held while an artifact in it is replaced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ArtifactWriter:
    """Build an artifact in a temporary directory; `commit()` moves it into place.

    An existing artifact of the same model (same signature, source file and
    weights) keeps its other targets, so targets can be added one compile at a
    time. One of another model is replaced only with `replace=True`, since its
    targets not rebuilt (`targets`) would be lost. Commits into one directory are
    serialised (flock): two compiles into the same path leave one complete
    artifact holding both compiles' targets when they built the same model."""

    def __init__(self, path: str | os.PathLike, signature: Mapping[str, Any], *, source: Optional[str] = None,
                 targets: Sequence[str] = (), replace: bool = False):
        self.path = check_output(path)
        self.targets = list(targets)
        self.replace = replace
        self.manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "polyport_version": __version__,
                                         "model": dict(signature), "targets": {}, "files": {}}
        if source is not None:
            self.manifest["source_sha256"] = source
        self.tmp = files.temp_dir_beside(self.path)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_weights(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Write the weights; then refuse at once (before any lowering) to replace another model's artifact."""
        with open(self.tmp / WEIGHTS, "wb") as f:
            safetensors.save(tensors, f, {"producer": f"polyport {__version__}"})
        # what loading checks the file against: weights of another model, even re-hashed, are refused
        self.manifest["weights"] = {n: [str(np.asarray(w).dtype), list(np.shape(w))] for n, w in tensors.items()}
        self.existing()

    def existing(self) -> tuple[list[str], list[str]]:
        """(targets carried over from the artifact at `path`, targets of another model dropped with `replace`)."""
        if not (self.path / MANIFEST).is_file():
            check_output(self.path)                 # still not a foreign directory
            return [], []
        try:
            old = read_manifest(self.path)
            theirs = dict(old["targets"])
            same = (old["model"] == self.manifest["model"]
                    and old.get("source_sha256") == self.manifest.get("source_sha256")
                    and (self.tmp / WEIGHTS).is_file()
                    and old["files"].get(WEIGHTS) == sha256(self.tmp / WEIGHTS))
        except (ArtifactError, KeyError, TypeError, AttributeError):
            theirs, same = {}, False
        others = sorted(t for t in theirs if t not in self.targets and t not in self.manifest["targets"])
        if same:
            return others, []
        if not self.replace:
            what = f"its {', '.join(others)} target(s) would be lost" if others else "it would be overwritten"
            raise ArtifactError(f"{self.path} holds an artifact of another model ({old_name(self.path)}); {what}: "
                                "pass --replace to replace it, or choose another -o directory")
        return [], others

    def target_dir(self, target: str) -> Path:
        d = self.tmp / target
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        return d

    def add_target(self, target: str, entry: Mapping[str, Any]) -> None:
        self.manifest["targets"][target] = dict(entry)

    def commit(self) -> Path:
        """Move the artifact into place, replacing the one at `path`."""
        with _locked(self.path.parent):
            carried, _ = self.existing()            # again: another compile may have committed meanwhile
            if carried:
                old = read_manifest(self.path)
                for name in carried:
                    shutil.copytree(self.path / name, self.tmp / name)
                    self.manifest["targets"][name] = old["targets"][name]
            digests = {}
            for p in sorted(self.tmp.rglob("*")):
                if p.is_file():
                    digests[p.relative_to(self.tmp).as_posix()] = sha256(p)
            self.manifest["files"] = digests
            with open(self.tmp / MANIFEST, "w") as f:
                json.dump(self.manifest, f, indent=2, sort_keys=True)
            # Ctrl-C waits for the renames: stopped between them, it would leave no artifact at `path`
            with interrupts.held():
                old_dir = None
                if self.path.exists():
                    old_dir = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
                    os.replace(self.path, old_dir)
                os.replace(self.tmp, self.path)
                if old_dir is not None:
                    shutil.rmtree(old_dir, ignore_errors=True)
        return self.path


def old_name(path: Path) -> str:
    """The model name an existing artifact's manifest records (for messages)."""
    try:
        return str(json.loads((path / MANIFEST).read_text())["model"]["name"])
    except Exception:  # noqa: BLE001 - only for a message: any unreadable manifest reads the same
        return "unreadable manifest"


def _entry_paths(entry: Mapping[str, Any]) -> list[Any]:
    """The files (relative to the artifact) a target entry tells its loader to open."""
    paths = [entry[k] for k in ("library", "meta") if k in entry]
    libraries = entry.get("libraries", {})
    return paths + list(libraries.values() if isinstance(libraries, dict) else [libraries])


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path}: not a polyport artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mf}: unreadable manifest ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{mf}: artifact format version {version!r}; this polyport reads {FORMAT_VERSION}")
    for key, kind in (("model", dict), ("targets", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{mf}: malformed manifest ({key!r} is missing or not an object); "
                                "recompile the artifact")
    model = manifest["model"]
    if not all(isinstance(model.get(k), list) and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                      for s in model[k]) for k in ("inputs", "outputs")):
        raise ArtifactError(f"{mf}: malformed manifest (model inputs/outputs); recompile the artifact")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()) or \
            not all(isinstance(e, dict) for e in manifest["targets"].values()):
        raise ArtifactError(f"{mf}: malformed manifest (files or target entries); recompile the artifact")
    from .session import signature_index_ranges, signature_types      # session imports this module
    try:
        signature_types(model["inputs"] + model["outputs"])
        signature_index_ranges(model["inputs"])
    except Exception as e:  # noqa: BLE001 - any malformed spec (wrong types, unknown dtype, bad dim text)
        raise ArtifactError(f"{mf}: malformed manifest (model signature: {type(e).__name__}: {e}); "
                            "recompile the artifact") from None
    return manifest


class Artifact:
    """A read-only view of an artifact directory, verified per target on use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        for rel in self.manifest["files"]:
            self._inside(rel)
        for name, entry in self.manifest["targets"].items():
            for rel in _entry_paths(entry):
                self._inside(rel)
                if rel not in self.manifest["files"]:
                    raise ArtifactError(f"{self.path}: target {name} loads {rel!r}, which the manifest does not "
                                        "hash; recompile the artifact")

    def _inside(self, rel: Any) -> Path:
        """`rel` as a path inside the artifact: one that leaves it (absolute, `..`, a symlink out) is refused
        before anything is read from it (a library is native code: loading it runs it)."""
        if not isinstance(rel, str) or not rel:
            raise ArtifactError(f"{self.path}: malformed manifest: {rel!r} is not a file path; recompile the artifact")
        parts = PurePosixPath(rel).parts
        if parts[0] == "/" or ".." in parts:
            raise ArtifactError(f"{self.path}: the manifest names {rel!r}, outside the artifact directory; "
                                "refusing to load it")
        full = self.path / rel
        if not full.resolve().is_relative_to(self.path.resolve()):
            raise ArtifactError(f"{self.path}: {rel} is a link leading outside the artifact directory "
                                f"(to {full.resolve()}); refusing to load it")
        return full

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
            p = self._inside(rel)
            if not p.is_file():
                raise ArtifactError(f"{self.path}: file {rel} listed in the manifest is missing")
            if sha256(p) != digest:
                raise ArtifactError(f"{self.path}: file {rel} does not match its hash in the manifest "
                                    "(tampered with or truncated); recompile the artifact")

    def weights(self) -> dict[str, np.ndarray]:
        """The weights, refused when their names, dtypes or shapes differ from what the compile recorded."""
        try:
            tensors = safetensors.load(self._inside(WEIGHTS))
        except safetensors.SafetensorsError as e:
            raise ArtifactError(str(e)) from None
        want = self.manifest.get("weights")
        if isinstance(want, dict):
            got = {n: [str(w.dtype), list(w.shape)] for n, w in tensors.items()}
            for name in sorted(set(want) | set(got)):
                if want.get(name) != got.get(name):
                    raise ArtifactError(f"{self.path}: {WEIGHTS} holds {name!r} as {got.get(name) or 'nothing'}, the "
                                        f"compiled model expects {want.get(name) or 'no such weight'} (weights of "
                                        "another model?); recompile the artifact")
        return tensors

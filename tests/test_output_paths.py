"""Where compile, run, bench and report write: nothing lost, nothing half-written, umask permissions.

`compile -o` never replaces a directory that is not an artifact, replaces an
artifact of another model only with --replace, and refuses the paths `run -o`
refuses (missing parent, read-only parent, the current directory) with the
same one line. Ctrl-C during a compile ends in "polyport: interrupted" with
exit 130 and leaves neither an artifact nor a temporary directory; two
compiles into one path leave one complete artifact.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from polyport.runtime.artifact import Artifact

from .real_models import model_path

LLAMA = model_path("llama_a")
OTHER = model_path("llama_b")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _compile(cli, out, *extra, model=LLAMA):
    return cli("compile", model, "--target", "ascend", "-o", out, *extra)


def test_compile_refuses_a_directory_that_is_not_an_artifact(cli, tmp_path):
    victim = tmp_path / "work"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    os.chmod(victim, 0o755)
    r = _compile(cli, victim)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"polyport: error: {victim} exists and is not a polyport artifact "
                                             "(no manifest.json); refusing to replace it: choose another -o "
                                             "directory, or remove it"]
    assert [p.name for p in victim.iterdir()] == ["notes.txt"] and _mode(victim) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]      # no temporary directory left


def test_another_model_is_replaced_only_with_replace(cli, tmp_path):
    art = tmp_path / "art"
    assert _compile(cli, art).exit_code == 0
    before = (art / "manifest.json").read_bytes()
    r = _compile(cli, art, model=OTHER)
    assert r.exit_code == 2
    assert "holds an artifact of another model (llama_a)" in r.stderr and "--replace" in r.stderr
    assert (art / "manifest.json").read_bytes() == before
    r = _compile(cli, art, "--replace", model=OTHER)
    assert r.exit_code == 0, r.stderr
    assert Artifact(art).signature["name"] == "llama_b"


def test_same_model_keeps_its_other_targets(tmp_path):
    from polyport.compiler import compile_model
    from polyport.runtime.artifact import ArtifactError
    art = tmp_path / "art"
    compile_model(LLAMA, ["ascend"], art)
    with pytest.raises(ArtifactError, match="its ascend target\\(s\\) would be lost"):
        compile_model(OTHER, ["ascend", "cpu"][1:], art)     # another model, rebuilding only cpu
    assert Artifact(art).targets == ["ascend"]


@pytest.mark.parametrize("command", ["compile", "run"])
@pytest.mark.parametrize("where,says", [
    ("missing/art", "directory {parent} does not exist"),
    (".", "it is the current directory"),
])
def test_unwritable_outputs_one_line(cli, tmp_path, monkeypatch, command, where, says):
    monkeypatch.chdir(tmp_path)
    parent = tmp_path / "missing"
    if command == "compile":
        r = _compile(cli, where)
    else:
        r = cli("run", LLAMA, "--seq", "2", "-o", where)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("polyport: error: "), lines
    if command == "run" and where == ".":
        assert "'.' is a directory" in lines[0]
    else:
        assert lines[0].startswith(f"polyport: error: cannot write {where}: {says.format(parent=parent)}"), lines
    assert not parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("command", ["compile", "run"])
def test_read_only_parent_one_line(cli, tmp_path, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    r = _compile(cli, ro / "art") if command == "compile" else cli("run", LLAMA, "--seq", "2", "-o", ro / "o.npz")
    assert r.exit_code == 2 and f"directory {ro} is not writable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_outputs_get_umask_permissions(cli, tmp_path, umask_022):
    art = tmp_path / "art"
    assert _compile(cli, art).exit_code == 0
    assert _mode(art) == 0o755 and _mode(art / "manifest.json") == 0o644
    assert all(_mode(p) == (0o755 if p.is_dir() else 0o644) for p in art.rglob("*"))
    r = cli("bench", art, "--target", "ascend", "--seq", "1", "--runs", "1", "--warmup", "0",
            "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    assert _mode(tmp_path / "b.json") == 0o644
    assert cli("run", LLAMA, "--seq", "2", "-o", tmp_path / "o.npz").exit_code == 0
    assert _mode(tmp_path / "o.npz") == 0o644


def test_one_atomic_writer():
    """Every temporary-file-then-rename write in the project goes through polyport/files.py."""
    root = Path(__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")       # hidden folders: a venv, a bundle
                   if "tests" not in p.parts and p.name != "files.py" and not p.relative_to(root).parts[0].startswith(".")
                   and ("mkstemp" in p.read_text() or "mkdtemp" in p.read_text()))
    assert users == []


def _interrupted_compile(cwd: Path, target: str, delay: float) -> tuple[int, str]:
    p = subprocess.Popen([sys.executable, "-m", "polyport.cli", "compile", str(LLAMA), "-t", target, "-o", "art"],
                         cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    first = p.stderr.readline()                 # "polyport: importing ...": the handlers are in place
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    err = first + p.stderr.read()
    return p.wait(timeout=300), err


@pytest.mark.parametrize("target,delays", [
    ("ascend", (0.0, 0.4)),
    pytest.param("cpu", (0.0, 0.5, 1.5, 3.0), marks=pytest.mark.slow),
])
def test_sigint_during_compile(tmp_path, target, delays):
    """Ctrl-C leaves no artifact and no temporary directory, or (when it lands after the commit) a whole one."""
    for delay in delays:
        cwd = tmp_path / str(delay)
        cwd.mkdir()
        rc, err = _interrupted_compile(cwd, target, delay)
        assert "Traceback" not in err, err
        if sorted(p.name for p in cwd.iterdir()) == ["art"]:
            # The signal came after the commit: the compile reports it (130), or it finished first (0),
            # or the signal came while the interpreter was exiting, when Python's default action ends it (-2).
            assert rc in (0, 130, -signal.SIGINT), err
            Artifact(cwd / "art").verify()
            continue
        assert rc == 130, err
        assert err.strip().splitlines()[-1] == "polyport: interrupted"
        assert sorted(p.name for p in cwd.iterdir()) == [], (delay, list(cwd.iterdir()))


def test_two_compiles_into_one_path(tmp_path):
    cmd = [sys.executable, "-m", "polyport.cli", "compile", str(LLAMA), "-t", "ascend", "-o", "art"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    art = Artifact(tmp_path / "art")
    art.verify()
    assert art.targets == ["ascend"]

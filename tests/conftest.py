"""Shared pytest fixtures. Kept light: the conformance suite collects through this file too."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

CONFORMANCE_DIR = Path(__file__).parent / "conformance"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    """When the marker expression deselects conformance (the README's test command) skip even importing
    tests/conformance: every test there carries the marker, and generating the ONNX
    backend cases costs about a minute per xdist worker just to deselect them all."""
    if collection_path == CONFORMANCE_DIR and "not conformance" in config.getoption("markexpr", ""):
        return True
    return None


@dataclasses.dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


@pytest.fixture
def cli():
    """`cli(*args)` runs the `polyport` command in-process and returns a CliResult."""
    from click.testing import CliRunner

    from polyport.cli import main

    try:
        runner = CliRunner(mix_stderr=False)   # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        runner = CliRunner()                   # click >= 8.2 always keeps them apart

    def invoke(*args: str) -> CliResult:
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=True)
        return CliResult(result.exit_code, result.stdout, result.stderr, result.exception)

    return invoke


@pytest.fixture(scope="session")
def llama_artifact(tmp_path_factory):
    """llama_a (examples/models) compiled once for cpu and ascend: the artifact the reliability tests share
    (without generation programs: none of them generates, and the cpu build takes a third of the time)."""
    from polyport.compiler import compile_model
    from .real_models import model_path
    return compile_model(model_path("llama_a"), ["cpu", "ascend"], tmp_path_factory.mktemp("llama") / "art",
                         generation=False)

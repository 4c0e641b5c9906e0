"""The official ONNX backend test suite (onnx 1.23.2) through `polyport.backend.cpu`.

Every generated `_cpu` case (node, simple, pytorch-converted, pytorch-operator,
real) runs: ONNX -> polyport import -> default passes -> the cpu target's TVM
build -> Relax VM, compared with the expected outputs. The cases the cpu target
is known to fail are listed, grouped by reason, in `backend_cpu_xfail.txt`;
they are strict expected failures, so a case that starts passing fails the run
until its line is removed.

    python -m pytest tests/conformance/test_backend_cpu.py -n 2 -q -p no:cacheprovider
"""
from __future__ import annotations

import os

# The cases are tiny and xdist runs one per core: TVM's own thread pool would only contend
# (its workers spin after each call). Set before the cpu session first imports TVM.
os.environ.setdefault("TVM_NUM_THREADS", "1")

import onnx.backend.test  # noqa: E402
import pytest

import polyport.backend.cpu  # noqa: E402

from .harness import cpu_cases, load_exclusions  # noqa: E402

pytestmark = pytest.mark.conformance

XFAIL_FILE = os.path.join(os.path.dirname(__file__), "backend_cpu_xfail.txt")


def _mark_expected_failures(cases: dict[str, type], xfail: dict[str, str]) -> dict[str, type]:
    unknown = set(xfail)
    for cls in cases.values():
        for attr in [a for a in vars(cls) if a in xfail]:
            setattr(cls, attr, pytest.mark.xfail(reason=xfail[attr], strict=True)(getattr(cls, attr)))
            unknown.discard(attr)
    if unknown:   # a stale line (a case renamed or removed by an onnx upgrade) must not hide silently
        raise ValueError(f"{XFAIL_FILE}: no such case: {', '.join(sorted(unknown))}")
    return cases


backend_test = onnx.backend.test.BackendTest(polyport.backend.cpu, __name__)
globals().update(_mark_expected_failures(cpu_cases(backend_test), load_exclusions(XFAIL_FILE)))

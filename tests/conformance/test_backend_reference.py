"""The official ONNX backend test suite (onnx 1.23.2) through `polyport.backend.reference`.

Every generated `_cpu` case of the node, simple, pytorch-converted, pytorch-operator
and real kinds runs: ONNX -> polyport import -> reference executor, compared with the
expected outputs. The `_cuda` variants are not collected. No network is needed: in
onnx 1.23 the "real" cases use the small "light" models bundled with onnx (weights
replaced by ConstantOfShape) and write their test data under $ONNX_HOME/models/light
(default ~/.onnx).
Cases polyport is known to fail are listed, each with its reason, in
`backend_reference_xfail.txt` and reported as skipped.

    python -m pytest tests/conformance/test_backend_reference.py -n 2 -q -p no:cacheprovider
"""
from __future__ import annotations

import os
import re

import onnx.backend.test
import pytest

import polyport.backend.reference

from .harness import cpu_cases, load_exclusions

pytestmark = pytest.mark.conformance

XFAIL_FILE = os.path.join(os.path.dirname(__file__), "backend_reference_xfail.txt")


def _make_backend_test() -> onnx.backend.test.BackendTest:
    bt = onnx.backend.test.BackendTest(polyport.backend.reference, __name__)
    for name in load_exclusions(XFAIL_FILE):
        bt.exclude(f"^{re.escape(name)}$")
    return bt


backend_test = _make_backend_test()
globals().update(cpu_cases(backend_test))

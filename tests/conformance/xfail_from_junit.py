"""Write an expected-failure file from a conformance run's JUnit XML, failures grouped by reason.

    python -m pytest tests/conformance/test_backend_cpu.py -n 2 -q --junitxml=run.xml
    python tests/conformance/xfail_from_junit.py run.xml tests/conformance/backend_cpu_xfail.txt

Failed cases are listed with a one-line reason taken from their error; cases already
expected to fail keep their line (a strict xfail that passed is a failure and drops out,
its line to be removed by hand).
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

HEADER = """\
# ONNX backend cases (onnx 1.23.2, `_cpu`) that polyport.backend.cpu does not pass, one per line:
#   test_name_cpu  # reason
# Generated from a real run by xfail_from_junit.py; read by test_backend_cpu.py, where each is a strict
# expected failure (a case that starts passing fails the run until its line is removed).
"""


def classify(message: str) -> tuple[str, str]:
    """(group, one-line reason) for a failure message."""
    first = " ".join(message.split())
    m = re.search(r"node \S+ \(([\w:.]+)\): no lowering for this op", first)
    if m:
        return f"op not lowered: {m.group(1)}", f"no cpu lowering for {m.group(1)}"
    m = re.search(r"node \S+ \(([\w:.]+)\): (?:not supported by the cpu target: )?(.*)", first)
    if m and "UnsupportedOpError" in first:
        op, why = m.group(1), m.group(2)[:160]
        group = "dtype" if re.search(r"\bdtype\b", why) else f"op form not supported: {op}"
        return group, f"{op}: {why}"
    if "has no supported element type" in first:
        return "dtype", first.split("cpu target: ", 1)[-1][:160]
    if "inputs need a known rank" in first:
        return "sequence / optional values", first.split(": ", 1)[-1][:160]
    if first.startswith("AssertionError") or "Not equal to tolerance" in first or "Mismatch" in first:
        return "wrong result", "output differs from the expected: " + first[:120]
    if "ExecutionError" in first:
        return "fails at run time", first.split("cpu: ", 1)[-1][:160]
    return "other", first[:160]


def main(junit: str, out: str) -> None:
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for tc in ET.parse(junit).getroot().iter("testcase"):
        for child in tc:
            if child.tag in ("failure", "error"):
                group, reason = classify(child.get("message") or "")
            elif child.tag == "skipped" and child.get("type") == "pytest.xfail":
                group, reason = "kept", (child.get("message") or "").removeprefix("reason: ")
            else:
                continue
            groups[group].append((tc.get("name"), reason))
    kept = dict(groups.pop("kept", []))
    for name, reason in kept.items():         # an earlier line keeps its group and reason
        groups[_group_of(out, name)].append((name, reason))
    with open(out, "w", encoding="utf-8") as f:
        f.write(HEADER)
        for group in sorted(groups, key=lambda g: (-len(groups[g]), g)):
            f.write(f"\n# --- {group} ({len(groups[group])})\n")
            for name, reason in sorted(groups[group]):
                f.write(f"{name}  # {reason}\n")


def _group_of(path: str, name: str) -> str:
    group = "other"
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("# --- "):
                    group = re.sub(r" \(\d+\)$", "", line[6:].strip())
                elif line.split("#")[0].strip() == name:
                    return group
    except OSError:
        pass
    return group


if __name__ == "__main__":
    main(*sys.argv[1:3])

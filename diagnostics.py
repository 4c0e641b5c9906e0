"""Warnings a compile step raises, gathered into one line for the user instead of pages of raw text.

A target's lowering may warn in Python (ascend's AscendFallbackWarning, also
recorded in the manifest entry) or print from native code straight to file
descriptor 2 (TVM's ROCm codegen logs one "Warning:" line per kernel). Neither
is something a user can act on one by one; `captured()` collects both while a
step runs and `summary()` turns them into one line. Native output that is not
a warning is passed on to stderr unchanged.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator

_NATIVE_WARNING = re.compile(r"^\[[\d:]+\] \S+: Warning: (.*)$")     # TVM's LOG(WARNING) format


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """Collect the warnings (Python and native) raised inside the block into the yielded list."""
    found: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(sink.fileno(), 2)
        try:
            yield found
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            found.extend(f"{w.category.__name__}: {w.message}" for w in caught)
            sink.seek(0)
            other = []
            for line in sink.read().decode(errors="replace").splitlines():
                m = _NATIVE_WARNING.match(line)
                if m:
                    found.append(m.group(1))
                elif line.strip():
                    other.append(line)
            if other:
                print("\n".join(other), file=sys.stderr)


def summary(what: str, found: list[str]) -> str:
    """`what: N warnings (K kinds), e.g. <the most frequent one, shortened>`."""
    counts = collections.Counter(found)
    example = counts.most_common(1)[0][0]
    example = example if len(example) <= 150 else example[:150] + "..."
    kinds = f" ({len(counts)} kinds)" if len(counts) > 1 else ""
    return f"{what}: {len(found)} warning{'s' * (len(found) != 1)}{kinds}, e.g. {example}"

"""runtime/host_weights.py: a host session's weights in one huge-page-advised mapping, handed to TVM by DLPack."""
import re

import ml_dtypes
import numpy as np
import pytest

from polyport.runtime import host_weights


def _vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding `address`."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def test_weights_keep_their_values_and_the_prepared_layout():
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((64, 96)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "empty": np.zeros((0, 4), np.float32), "bf": rng.standard_normal(8).astype(ml_dtypes.bfloat16)}
    packed = lambda name, a: np.moveaxis(a.reshape(64, 3, 32), -2, -3) if name == "w" else a   # noqa: E731
    out = host_weights.host_tensors(weights, weights, packed)
    assert np.array_equal(out["w"].numpy(), packed("w", weights["w"]))      # written from the view
    assert np.array_equal(out["b"].numpy(), weights["b"]) and out["empty"].numpy().shape == (0, 4)
    assert np.array_equal(out["bf"].numpy().view(np.uint16), weights["bf"].view(np.uint16))


def test_the_mapping_starts_on_a_huge_page_and_is_advised():
    buf = host_weights._advised(3 << 20)
    assert buf.ctypes.data % host_weights.HUGE_PAGE == 0 and buf.nbytes == 3 << 20 and buf.flags.writeable
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off here")
    flags = _vma_flags(buf.ctypes.data)
    assert "hg" in flags["VmFlags"].split()          # MADV_HUGEPAGE took: the kernel may back it with 2 MiB
    assert flags.get("THPeligible", "1") == "1"

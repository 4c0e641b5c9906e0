"""A call whose inputs and outputs cannot fit in memory fails with one line before anything is allocated."""
from __future__ import annotations

import numpy as np
import pytest

import polyport.runtime.session as session
from polyport import errors
from polyport.runtime import memory


@pytest.mark.parametrize("target", ["cpu", "ascend"])
def test_seq_1e7_refused_when_memory_is_short(llama_artifact, monkeypatch, target):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**30)
    sess = session.load(llama_artifact, target)
    ids = np.zeros((1, 10**7), dtype=np.int64)
    with pytest.raises(errors.ResourceError) as e:
        sess.run({"input_ids": ids})
    assert str(e.value) == (f"{target}: at seq = 10000000 the inputs and outputs alone need 9.6 GiB, this machine "
                            "has 1.0 GiB available; use a shorter input")
    sess.run({"input_ids": ids[:, :4]})                    # a call that fits still runs


def test_more_than_this_machine_has(llama_artifact):
    free = memory.available_bytes()
    if free is None:
        pytest.skip("no /proc/meminfo here")
    seq = free // (256 * 4) + 1                             # the f32[1, seq, 256] logits alone exceed it
    ids = np.broadcast_to(np.int64(1), (1, seq))           # a view: no memory of its own
    with pytest.raises(errors.ResourceError, match="use a shorter input"):
        session.load(llama_artifact, "cpu").run({"input_ids": ids})

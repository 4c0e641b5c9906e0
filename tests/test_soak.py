"""Long runs (marker `soak`, a CI step of its own): memory, files and threads stay flat.

10,000 calls of lengths 1..80 on one cpu session: resident memory after the
calls within 5% of what it was after a warm-up, and no more open files or
threads than after the warm-up. Loading and dropping a session 100 times
returns the memory (within 5% of the level after the first 10). The figures are
printed (`-s`) for the record.
"""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

import polyport.runtime.session as session

pytestmark = pytest.mark.soak


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _handles() -> tuple[int, int]:
    """(open file descriptors, OS threads) of this process."""
    with open("/proc/self/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return len(os.listdir("/proc/self/fd")), threads


def _calls(sess, n: int, rng) -> None:
    for _ in range(n):
        ids = rng.integers(0, 256, size=(1, int(rng.integers(1, 81))), dtype=np.int64)
        sess.run({"input_ids": ids})


def test_10000_calls_flat(llama_artifact):
    sess = session.load(llama_artifact, "cpu")
    rng = np.random.default_rng(0)
    _calls(sess, 500, rng)
    gc.collect()
    rss0, handles0 = _rss(), _handles()
    _calls(sess, 10_000, rng)
    gc.collect()
    rss1, handles1 = _rss(), _handles()
    print(f"10,000 calls: RSS {rss0 / 2**20:.1f} MiB after warm-up -> {rss1 / 2**20:.1f} MiB; "
          f"(fds, threads) {handles0} -> {handles1}")
    assert rss1 <= rss0 * 1.05
    assert handles1 <= handles0


def test_threads_come_and_go_flat(llama_artifact):
    """Request threads that each call once and exit leave no VM, thread or memory behind."""
    sess = session.load(llama_artifact, "cpu")
    rng = np.random.default_rng(1)

    def burst():
        ts = [threading.Thread(target=_calls, args=(sess, 5, np.random.default_rng(i))) for i in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    for _ in range(5):
        burst()
    gc.collect()
    rss0, handles0 = _rss(), _handles()
    for _ in range(50):
        burst()
    gc.collect()
    rss1, handles1 = _rss(), _handles()
    print(f"400 threads x 5 calls: RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB; {handles0} -> {handles1}")
    assert rss1 <= rss0 * 1.05 and handles1[0] <= handles0[0]
    _calls(sess, 1, rng)


def test_load_and_drop_100_times(llama_artifact):
    def cycle(n):
        for _ in range(n):
            sess = session.load(llama_artifact, "cpu")
            sess.run({"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})
            del sess
        gc.collect()
    cycle(10)
    rss0, handles0 = _rss(), _handles()
    cycle(90)
    rss1, handles1 = _rss(), _handles()
    print(f"100 loads: RSS {rss0 / 2**20:.1f} MiB after 10 -> {rss1 / 2**20:.1f} MiB; {handles0} -> {handles1}")
    assert rss1 <= rss0 * 1.05
    assert handles1 <= handles0

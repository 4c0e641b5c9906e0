"""Ctrl-C during a compile: always "interrupted", however deep inside TVM or a toolchain it lands.

A KeyboardInterrupt raised while TVM has called back into Python (e.g.
`nvcc.get_target_compute_version`) comes out as TVM's own error with a long
traceback, or is dropped and the compile carries on. While `deferred()` is
active, SIGINT is remembered as well as raised: an exception that escapes
while an interrupt is pending is reported as that interrupt, and the
`checkpoint` it yields (called between steps) raises one that was dropped.
`held()` keeps SIGINT out of a step that must not stop halfway (an artifact's
commit) and raises it when the step is done.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def _on_sigint(handler) -> Iterator[None]:
    """`handler` takes SIGINT during the block; then the one before it does again (Python's own where that
    one was installed outside Python)."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@contextlib.contextmanager
def deferred() -> Iterator[Callable[[], None]]:
    if threading.current_thread() is not threading.main_thread():    # signals reach the main thread only
        yield lambda: None
        return
    pending: list[int] = []

    def on_sigint(signum, frame):
        pending.append(signum)
        raise KeyboardInterrupt

    def checkpoint() -> None:
        if pending:
            raise KeyboardInterrupt

    with _on_sigint(on_sigint):
        try:
            yield checkpoint
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            if pending:
                raise KeyboardInterrupt from e
            raise


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGINT waits until the block has finished, then goes to the handler that was in place before it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    with _on_sigint(lambda signum, frame: caught.append(signum)):
        yield
    if caught:
        signal.raise_signal(signal.SIGINT)     # now handled as if it came this moment (deferred: raised)

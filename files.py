"""Writing outputs without losing data: the project's one atomic writer.

Every file polyport writes (run --output, bench --json, report --plot, IR
dumps, the artifact directory) is made beside its destination under a
temporary name and renamed into place only when complete, so a failed or
interrupted command never leaves a half-written file. What is written gets the
permissions the user's umask gives a new file or directory (tempfile's 0600 /
0700 are replaced before the rename). Paths that cannot be written are
refused before any work, with one line naming the path and the reason.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from . import errors


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, *, directory_ok: bool = False) -> None:
    """Fail before the work, not after it, when `path` cannot be written (a file, or a directory if allowed)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and not directory_ok:
        raise errors.PolyportError(f"cannot write {path}: it is a directory")
    if os.path.exists(path) and not os.path.isdir(path) and directory_ok:
        raise errors.PolyportError(f"cannot write {path}: it is a file, not a directory")
    if not os.path.isdir(parent):
        raise errors.PolyportError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise errors.PolyportError(f"cannot write {path}: directory {parent} is not writable")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary file path beside `path`; what the block writes there replaces `path` if it succeeds."""
    path = os.fspath(path)
    check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=f".{os.path.basename(path)}.", suffix=suffix)
        os.close(fd)
    except OSError as e:
        raise errors.PolyportError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise errors.PolyportError(f"cannot write {path}: {e.strerror or e}") from None
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` only if the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def temp_dir_beside(path: Path) -> Path:
    """An empty directory next to `path` (same file system: renamed onto it when complete), umask permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp

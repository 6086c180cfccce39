"""An exclusive, non-blocking lock on a folder, released when its holder exits (even by kill -9).

The lock is `flock` on a file in the folder; the holder deletes the file when it
releases. A process that opened the file just before it was deleted would lock
an orphan, so after locking it checks that the path still names the file it
locked, and tries again otherwise. On network file systems `flock` is as
reliable as the file system's own locking (NFSv4: yes; some FUSE mounts: no).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


class FolderBusy(Exception):
    """Another process holds the lock; the message names its pid when known."""


def _holder(path: str) -> str:
    with contextlib.suppress(OSError), open(path) as file:
        pid = file.read().strip()
        if pid.isdigit():
            return f"process {pid}"
    return "another process"


def acquire(folder: str, name: str) -> int:
    """Lock `folder` (file `name` inside it); return the descriptor for `release`, or raise FolderBusy."""
    path = os.path.join(folder, name)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(_holder(path)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder released (deleted the file) between our open and flock: lock the new one


def release(folder: str, name: str, fd: int) -> None:
    """Delete the lock file and unlock (in that order, so that no one locks a file about to vanish)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, name))
    os.close(fd)


@contextlib.contextmanager
def locked(folder: str, name: str) -> Iterator[None]:
    """`acquire` ... `release` around a block."""
    fd = acquire(folder, name)
    try:
        yield
    finally:
        release(folder, name, fd)

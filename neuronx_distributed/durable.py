"""Writes that survive a crash: fsync of files and folders, and a file replaced in one rename."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (renames, new and deleted files), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_with_text(final: str | os.PathLike, text: str, aside: str | os.PathLike) -> None:
    """Write `text` to `aside`, fsync it, rename it over `final` and fsync the folder: `final` is old or new, never partial."""
    try:
        with open(aside, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(aside, final)
    except BaseException:
        if os.path.exists(aside):
            os.remove(aside)
        raise
    fsync_path(os.path.dirname(os.path.abspath(final)))

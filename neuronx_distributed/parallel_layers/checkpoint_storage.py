"""Writing checkpoint files: safetensors straight from tensor memory, checksummed on the way, and published atomically.

`write_safetensors` writes the file format that `safetensors.safe_open` reads (an
8-byte header length, a JSON header padded to 8 bytes, then each tensor's bytes in
order) from each tensor's own memory: no serialized copy of the data is made. The
crc32 of each tensor is computed on the way (zlib-ng's, the same polynomial as
zlib's, several times faster), 1 MiB at a time, each piece just before it is
written (the write then copies it from the CPU's cache: one pass over memory for
both); the file's crc32 is combined from the header's and the tensors'
(`crc32_combine`, no second pass). After every 32 MiB, `sync_file_range` (Linux) starts the
disk on what is written, so the final fsync waits for the tail only (an
fdatasync per chunk would too, but commits the filesystem's journal each time,
which on ext4 also waits for every other process's pending data). `publish` renames a
finished file into place and fsyncs its folder; `write_aside` runs a writer on
the path beside the final one and removes what it left if it fails. Shard files
are written through them (`checkpoint_format.write_shard_file`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
from collections.abc import Callable

import torch
from zlib_ng.zlib_ng import crc32, crc32_combine

from ..durable import fsync_path
from .manifest_schema import SAFETENSORS_DTYPES

_PIECE_BYTES = 1024 * 1024  # checksummed, then written, while it is in the CPU's cache
_WRITEBACK_BYTES = 32 * 1024 * 1024  # the disk is started on each run of this many written bytes
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, wait for nothing


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes of the file from `offset` to disk (no journal commit); a no-op
    where the system has no sync_file_range. Durability still comes from the fsync that follows."""
    start = _sync_file_range()
    if start is not None:
        start(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def drop_cached_pages(paths) -> None:
    """Ask the kernel to drop the cached pages of the files at `paths` (`posix_fadvise` DONTNEED; missing files and
    systems without it are skipped). For files about to be replaced: the files stay whole on disk, and the new
    files' pages reuse that memory instead of the page cache holding both versions at once."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _flat_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU contiguous tensor's bytes, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header (padded with spaces to a multiple of 8) of a safetensors file of `tensors`."""
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        dtype = SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")][0]
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_all(fd: int, buffer: memoryview) -> None:
    while len(buffer):
        buffer = buffer[os.write(fd, buffer):]


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, int, dict[str, str]]:
    """Write `tensors` (CPU, contiguous, no shared storage needed) to a new file at `path` and fsync it.

    Returns (crc32 of the file, its size in bytes, name -> crc32 of each tensor's bytes),
    crc32s as 8 hex digits, computed from memory while the file is written; the data is
    written in the order of `tensors`.
    """
    prefix = safetensors_header(tensors, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    tensor_crcs = {}
    try:
        _write_all(fd, memoryview(prefix))
        file_crc, written, started = crc32(prefix), len(prefix), 0
        for name, tensor in tensors.items():
            data = _flat_bytes(tensor) if tensor.numel() else memoryview(b"")
            crc = 0
            for at in range(0, len(data), _PIECE_BYTES):
                piece = data[at:at + _PIECE_BYTES]
                crc = crc32(piece, crc)
                _write_all(fd, piece)
                written += len(piece)
                if written - started >= _WRITEBACK_BYTES:
                    start_writeback(fd, started, written - started)
                    started = written
            tensor_crcs[name] = f"{crc:08x}"
            file_crc = crc32_combine(file_crc, crc, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"{file_crc:08x}", written, tensor_crcs


def publish(aside: str, final: str) -> None:
    """Rename the finished (fsynced) file `aside` over `final` and fsync the folder: `final` is old or new, never partial."""
    os.replace(aside, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def write_aside(final: str, write: Callable[[str], object], aside: str | None = None):
    """`write(aside)` on the path beside `final` (default `final + '.tmp'`); return its result, or remove `aside` and re-raise.

    The writer must leave the file complete and fsynced; `publish` then makes it `final`.
    """
    aside = final + ".tmp" if aside is None else aside
    try:
        return write(aside)
    except BaseException:
        if os.path.lexists(aside):
            os.remove(aside)
        raise

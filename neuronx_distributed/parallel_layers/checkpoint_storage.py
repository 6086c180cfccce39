"""Writing checkpoint files: safetensors straight from tensor memory, checksummed on the way, and published atomically.

`write_safetensors` writes the file format that `safetensors.safe_open` reads (an
8-byte header length, a JSON header padded to 8 bytes, then each tensor's bytes in
order) from each tensor's own memory: no serialized copy of the data is made. The
crc32 of the whole file is computed while it is written and flushed, by a few
threads over fixed-size chunks of the data (zlib releases the GIL), joined with
`crc32_combine`; after each chunk a background fdatasync starts the disk on what
is written (unless one is still running), so the final fsync waits for the tail
only. `publish` renames a finished file into place and fsyncs its
folder; `write_aside` runs a writer on the path beside the final one and removes
what it left if it fails. Shard files are written through them
(`checkpoint_format.write_shard_file`).
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..durable import fsync_path
from .manifest_schema import SAFETENSORS_DTYPES

_CHUNK_BYTES = 32 * 1024 * 1024  # the unit of the parallel checksum
_CRC_THREADS = max(1, min(4, (os.cpu_count() or 1)))
_POLYNOMIAL = 0xEDB88320  # crc32's, reflected


def _times(matrix: list[int], vector: int) -> int:
    """A GF(2) 32x32 matrix (as 32 column words) times a 32-bit vector."""
    result, index = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[index]
        vector >>= 1
        index += 1
    return result


def _compose(first: list[int], second: list[int]) -> list[int]:
    """The matrix that applies `second`, then `first`."""
    return [_times(first, column) for column in second]


@functools.lru_cache(maxsize=64)
def _zeros_operator(length: int) -> tuple[int, ...]:
    """The matrix that advances a crc32 over `length` zero bytes (zlib's crc32_combine, as a reusable operator)."""
    one_bit = [_POLYNOMIAL] + [1 << n for n in range(31)]
    step = _compose(one_bit, one_bit)  # 2 bits
    step = _compose(step, step)  # 4 bits
    step = _compose(step, step)  # 1 byte
    result = [1 << n for n in range(32)]
    while length:
        if length & 1:
            result = _compose(step, result)
        length >>= 1
        if length:
            step = _compose(step, step)
    return tuple(result)


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and len(B)."""
    return _times(list(_zeros_operator(second_length)), first) ^ second


def _chunks(buffers: list[memoryview], size: int) -> list[list[memoryview]]:
    """`buffers` (flat bytes) cut into runs of `size` bytes (the last one shorter), across buffer boundaries."""
    chunks, current, filled = [], [], 0
    for buffer in buffers:
        at = 0
        while at < len(buffer):
            take = min(size - filled, len(buffer) - at)
            current.append(buffer[at:at + take])
            filled += take
            at += take
            if filled == size:
                chunks.append(current)
                current, filled = [], 0
    if current:
        chunks.append(current)
    return chunks


def _crc_of(pieces: list[memoryview]) -> tuple[int, int]:
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return crc, sum(len(piece) for piece in pieces)


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


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, int]:
    """Write `tensors` (CPU, contiguous, no shared storage needed) to a new file at `path` and fsync it.

    Returns (crc32 of the file as 8 hex digits, its size in bytes), computed from
    memory while the file is written; the data is written in the order of `tensors`.
    """
    prefix = safetensors_header(tensors, metadata)
    buffers = [_flat_bytes(tensor) for tensor in tensors.values() if tensor.numel()]
    chunks = _chunks(buffers, _CHUNK_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with ThreadPoolExecutor(max_workers=_CRC_THREADS) as pool, ThreadPoolExecutor(max_workers=1) as flusher:
            crcs = [pool.submit(_crc_of, chunk) for chunk in chunks]
            _write_all(fd, memoryview(prefix))
            flushing = None
            for chunk in chunks:
                for piece in chunk:
                    _write_all(fd, piece)
                if flushing is None or flushing.done():  # the disk writes what is written while the rest is copied
                    flushing = flusher.submit(os.fdatasync, fd)
            if flushing is not None:
                flushing.result()
            os.fsync(fd)
            crc = zlib.crc32(prefix)
            for future in crcs:
                chunk_crc, length = future.result()
                crc = crc32_combine(crc, chunk_crc, length)
    finally:
        os.close(fd)
    size = len(prefix) + sum(len(buffer) for buffer in buffers)
    return f"{crc:08x}", size


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

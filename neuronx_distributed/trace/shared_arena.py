"""Anonymous shared memory that holds a traced model's input and output tensors.

The caller creates the arena and hands its file descriptor to every worker
(`multiprocessing.reduction.send_handle`); all of them map the same pages and
see each tensor at the same offset. The memory has no name in /dev/shm (a memfd
on Linux, an unlinked temporary file elsewhere), so the kernel frees it when the
last process that maps it exits, however it exits.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import torch

from .signature import TensorSpec

_ALIGNMENT = 64


def _anonymous_file(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("nxd-traced-model-io")
    else:
        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, size)
    return fd


def _offsets(specs: list[TensorSpec]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for spec in specs:
        offsets.append(end)
        end += -(-spec.nbytes // _ALIGNMENT) * _ALIGNMENT
    return offsets, max(end, _ALIGNMENT)


class SharedArena:
    """One mapping holding a tensor per spec, in order; `tensors` are views into it."""

    def __init__(self, specs: list[TensorSpec], fd: int):
        offsets, size = _offsets(specs)
        self.fd = fd
        self._mapping = mmap.mmap(fd, size)
        raw = torch.frombuffer(self._mapping, dtype=torch.uint8)
        self.tensors = [
            raw[offset : offset + spec.nbytes].view(spec.dtype).view(spec.shape) for offset, spec in zip(offsets, specs)
        ]

    @classmethod
    def create(cls, specs: list[TensorSpec]) -> SharedArena:
        """A new zero-filled arena for `specs`."""
        return cls(specs, _anonymous_file(_offsets(specs)[1]))

    def close(self) -> None:
        """Drop the views, unmap and close the descriptor (the pages go when no process maps them)."""
        self.tensors = []
        try:
            self._mapping.close()
        except BufferError:
            pass  # a view is still referenced elsewhere; the mapping goes with it
        os.close(self.fd)


def copy_bytes(destination: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Copy a contiguous CPU tensor into another of the same size with one memcpy; return `destination`.

    Unlike `Tensor.copy_`, this never starts the intra-op thread pool, whose threads
    would keep spinning on the cores that the workers need right after.
    """
    ctypes.memmove(destination.data_ptr(), source.data_ptr(), destination.nbytes)
    return destination

"""A save or merge over an earlier one drops the earlier files' cached pages before it writes.

The earlier files are kept alive through a hard link made before the second save or
merge (which deletes their names), and their residency in the page cache is read with
mincore(2) before and after. Filesystems that keep file pages only in memory (tmpfs)
cannot drop them; there the tests skip.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
import torch
from torch import nn

from neuronx_distributed.parallel_layers import checkpoint_tools, save

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _resident_pages(path: str) -> int:
    """How many of the file's pages are in the page cache (mincore of a private mapping nothing writes to)."""
    size = os.path.getsize(path)
    pages = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        first = ctypes.c_char.from_buffer(mapped)
        try:
            if _libc.mincore(ctypes.addressof(first), size, pages) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del first  # release the export before the mapping closes
    return sum(byte & 1 for byte in pages.raw)


def _cached_then_linked(path: str, link: str) -> None:
    """Read `path` into the page cache and keep its file alive at `link`; skip where its pages cannot be dropped."""
    with open(path, "rb") as file:
        file.read()
    if not _resident_pages(path):
        pytest.skip("this filesystem does not keep the file's pages in the page cache")
    os.link(path, link)
    with open(link, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident_pages(link):
        pytest.skip("this filesystem cannot drop a file's cached pages (tmpfs)")
    with open(link, "rb") as file:
        file.read()
    assert _resident_pages(link)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))


def test_save_over_a_checkpoint_drops_its_files_pages(tmp_path):
    save_dir = str(tmp_path / "ckpt")
    save({"model": _model().state_dict()}, save_dir)
    folder = os.path.join(save_dir, "tp_rank_00")
    (earlier,) = os.listdir(folder)
    _cached_then_linked(os.path.join(folder, earlier), str(tmp_path / "earlier"))
    save({"model": _model().state_dict()}, save_dir)
    assert earlier not in os.listdir(folder)
    assert _resident_pages(str(tmp_path / "earlier")) == 0


def test_merge_over_a_merge_drops_its_files_pages(tmp_path):
    save_dir, out = str(tmp_path / "ckpt"), str(tmp_path / "merged")
    save({"model": _model().state_dict()}, save_dir)
    checkpoint_tools.merge(save_dir, out)
    _cached_then_linked(os.path.join(out, "model.safetensors"), str(tmp_path / "earlier"))
    checkpoint_tools.merge(save_dir, out)
    assert not os.path.samefile(os.path.join(out, "model.safetensors"), str(tmp_path / "earlier"))
    assert _resident_pages(str(tmp_path / "earlier")) == 0

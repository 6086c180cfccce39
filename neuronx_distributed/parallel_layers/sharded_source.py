"""Read a sharded checkpoint as any TP rank of any TP degree sees it.

Sharded tensors are cut from the slices of the source shards that the target
rank needs (`resharding`), in the saved layout (its parts and replicated blocks)
or in a `Target` layout that the model's parameter declares; replicated and
per-rank values, and the state structure, come from the source rank with the
target's index when there is one, else from TP rank 0. Every shard file is
checked against the manifest (`checkpoint_format.check_shard_file`) before it is
read, at the offsets that check validated, and `verify` checks the checksums of
just what a load will read: `read_into` reads a piece that is one run of the
file's bytes straight into the caller's tensor (preadv) and copies a strided one
from the memory-mapped file; `read` allocates the tensor (asking for huge pages:
a fresh tensor's 4 KiB page faults cost more than the read) and does the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
import os
import warnings
from dataclasses import dataclass

import torch

from ..errors import CheckpointCorruptError, CheckpointShapeError, ReshardError
from . import checkpoint_format as fmt
from .resharding import Part, check_divisible, check_parts, logical_size, parts_pieces
from .state_tree import tensor_names


@dataclass(frozen=True)
class Target:
    """The layout a reader wants a sharded tensor in: rank `rank` of `world_size`, partition dim made of `parts`."""

    parts: tuple[Part, ...]
    rank: int
    world_size: int


def check_entry_divisible(name: str, entry: fmt.TensorEntry, world_size: int) -> None:
    """Raise ReshardError unless the sharded tensor `entry`, in its saved layout, splits across `world_size` ranks."""
    if entry.parts is None:
        check_divisible(name, entry.shape, entry.partition_dim, entry.partition_stride, world_size)
    else:
        check_parts(name, entry.row_parts(), world_size)


class ShardedSource:
    """The tensors and structure that TP rank `rank` of `world_size` loads from the checkpoint at `load_dir`."""

    def __init__(self, load_dir: str, manifest: fmt.Manifest, rank: int, world_size: int):
        self.load_dir, self.manifest, self.rank, self.world_size = load_dir, manifest, rank, world_size
        self.source_world = manifest.tensor_parallel_size
        self.source_rank = self.source_rank_for(rank, manifest)
        self._checked: dict[int, fmt.ShardFile] = {}
        self._mapped: dict[int, mmap.mmap] = {}  # saved TP rank -> its shard file, mapped on first read
        self.structure = self.check_file(self.source_rank).structure

    def check_file(self, source_rank: int) -> fmt.ShardFile:
        """Saved TP rank `source_rank`'s shard file, checked against the manifest (once)."""
        if source_rank not in self._checked:
            self._checked[source_rank] = fmt.check_shard_file(self.load_dir, self.manifest, source_rank)
        return self._checked[source_rank]

    @staticmethod
    def source_rank_for(rank: int, manifest: fmt.Manifest) -> int:
        """The saved TP rank whose structure and unsharded values target rank `rank` takes."""
        return rank if rank < manifest.tensor_parallel_size else 0

    def names(self) -> list[str]:
        """Every tensor name in this rank's structure."""
        return list(dict.fromkeys(tensor_names(self.structure)))

    def check_loadable(self, names, targets: dict[str, Target] | None = None) -> None:
        """Raise ReshardError for any of `names` that cannot be cut for this TP degree (or its target in `targets`);
        check the files they are read from."""
        targets = targets or {}
        for name in names:
            entry = self.manifest.tensors[name]
            target = targets.get(name)
            if entry.layout == fmt.LOCAL and self.world_size != self.source_world:
                raise ReshardError(
                    f"'{name}' holds a different value on each of the {self.source_world} TP ranks that saved it and "
                    f"cannot be resharded to TP={self.world_size}; load with TP={self.source_world}. (Optimizer state "
                    "is per-rank when its parameters could not be matched to the model: build the optimizer from "
                    "model.named_parameters() to record the match.)"
                )
            if entry.layout == fmt.SHARDED and target is None:
                check_entry_divisible(name, entry, self.world_size)
            if entry.layout == fmt.SHARDED and target is not None:
                saved = logical_size(entry.row_parts())
                if logical_size(target.parts) != saved:
                    raise CheckpointShapeError(
                        f"'{name}' holds {saved} rows along dim {entry.partition_dim} (each replicated head once) but "
                        f"the model's parameter shards {logical_size(target.parts)}; build the model with the sizes it "
                        "was saved with."
                    )
            for source in self._ranks_read([name]):
                if name not in self.check_file(source).names:
                    raise CheckpointCorruptError(
                        f"{self.check_file(source).path} lacks '{name}', which TP rank {self.source_rank}'s structure names "
                        "and the manifest lists; the checkpoint's files do not belong together: restore it from a copy."
                    )

    def target(self, name: str) -> Target:
        """This rank's layout of sharded tensor `name` in the saved layout (parts and replication as saved)."""
        return Target(self.manifest.tensors[name].row_parts(), self.rank, self.world_size)

    def local_shape(self, name: str, target: Target | None = None) -> list[int]:
        """The shape of this rank's tensor `name` (in `target`'s layout when given)."""
        entry = self.manifest.tensors[name]
        shape = list(entry.shape)
        if entry.layout == fmt.SHARDED:
            target = target or self.target(name)
            shape[entry.partition_dim] = sum(part.size for part in target.parts) // target.world_size
        return shape

    def _ranks_read(self, names) -> list[int]:
        ranks = {fmt.file_holding(self.manifest.tensors[name], self.source_rank) for name in names} or {self.source_rank}
        sharded = [self.manifest.tensors[name] for name in names if self.manifest.tensors[name].layout == fmt.SHARDED]
        if sharded and (self.world_size != self.source_world or any(entry.parts is not None for entry in sharded)):
            ranks = set(range(self.source_world))
        return sorted(ranks)

    def verify(self, names, targets: dict[str, Target] | None = None) -> None:
        """Raise CheckpointCorruptError unless what reading `names` (in their `targets` layouts) reads matches the
        manifest's checksums: in a version-3 checkpoint the header of each file read (this rank's structure's
        included) and each tensor read from it, whole; in older ones each file read, whole."""
        targets, read = targets or {}, {self.source_rank: set()}
        for name in names:
            dim, pieces = self.pieces(name, targets.get(name))
            for source, start, stop in pieces:
                if dim is None or stop > start:
                    read.setdefault(source, set()).add(name)
        for source, tensors in sorted(read.items()):
            entry = self.manifest.files[source]
            if entry.tensor_crc32 is None:
                fmt.verify_file(self.load_dir, entry)
            else:
                fmt.verify_tensors(self.check_file(source), entry, tensors)

    def read(self, name: str, target: Target | None = None) -> torch.Tensor:
        """This rank's tensor `name` (in `target`'s layout when given), cut from the source shards: a new tensor."""
        dim, pieces = self.pieces(name, target)
        out = torch.empty(self._read_shape(name, target, dim, pieces), dtype=getattr(torch, self.manifest.tensors[name].dtype))
        _advise_huge_pages(out)
        self.read_into(out, name, target)
        return out

    def read_into(self, out: torch.Tensor, name: str, target: Target | None = None) -> None:
        """Copy what `read(name, target)` returns into `out` (cast to its dtype and device), piece by piece: no
        intermediate tensor. A piece that lies in one run of a shard file's bytes and lands in a contiguous CPU
        region of `out` of the file's dtype is read from the file straight into that region; any other piece is
        copied from the mapped file. Raises CheckpointShapeError unless `out` has the shape that `read` returns."""
        dim, pieces = self.pieces(name, target)
        shape = self._read_shape(name, target, dim, pieces)
        if list(out.shape) != shape:
            raise CheckpointShapeError(
                f"'{name}' is {shape} on this rank but the tensor to load it into is {list(out.shape)}; build the "
                "model with the sizes it was saved with."
            )
        at = 0
        for source, start, stop in pieces:
            region = out if dim is None else out.narrow(dim, at, stop - start)
            if not self._read_run_into(region, source, name, dim, start, stop):
                region.copy_(self._read_piece(source, name, dim, start, stop))
            at += stop - start

    def _read_shape(self, name: str, target: Target | None, dim: int | None, pieces) -> list[int]:
        """The shape of what `read(name, target)` returns, made of `pieces` (see `pieces`): a whole saved tensor's
        shape in the file that holds it (per-rank values may differ in shape between files), else `local_shape`."""
        if dim is not None:
            return self.local_shape(name, target)
        shard = self.check_file(pieces[0][0])
        if isinstance(shard, fmt.ShardFile):
            return list(shard.spans[name][1])
        return list(self._read_piece(pieces[0][0], name, None, 0, 0).shape)

    def pieces(self, name: str, target: Target | None = None) -> tuple[int | None, list[tuple[int, int, int]]]:
        """Where `read(name, target)` comes from: (partition dim, [(saved TP rank, first row, end row)] to
        concatenate along it), or (None, [(saved TP rank, 0, 0)]) for a whole saved tensor."""
        entry = self.manifest.tensors[name]
        if entry.layout != fmt.SHARDED:
            return None, [(fmt.file_holding(entry, self.source_rank), 0, 0)]
        saved, target = entry.row_parts(), target or self.target(name)
        if (target.parts, target.rank, target.world_size) == (saved, self.source_rank, self.source_world):
            return None, [(self.source_rank, 0, 0)]
        return entry.partition_dim, parts_pieces(saved, self.source_world, target.parts, target.rank, target.world_size)

    def _byte_run(self, source: int, name: str, dim: int | None, start: int, stop: int) -> tuple[str, int, int] | None:
        """(file path, offset, length) of rows start:stop along `dim` (all when None) of saved TP rank `source`'s
        tensor `name` when they are one run of bytes in its shard file (a whole tensor, or rows along a dim that
        only dims of size 1 precede); None when they are strided (or the file is not one of ours)."""
        shard = self.check_file(source)
        if not isinstance(shard, fmt.ShardFile):
            return None
        dtype, shape, offset = shard.spans[name]
        if dim is None:
            return shard.path, offset, math.prod(shape) * dtype.itemsize
        if math.prod(shape[:dim]) != 1:
            return None
        row_bytes = math.prod(shape[dim + 1:]) * dtype.itemsize
        return shard.path, offset + start * row_bytes, (stop - start) * row_bytes

    def _read_run_into(self, region: torch.Tensor, source: int, name: str, dim: int | None, start: int, stop: int) -> bool:
        """Read the piece from its shard file straight into `region` when the piece is one run of the file's bytes
        and `region` a contiguous CPU tensor of the file's dtype; return whether it did."""
        shard = self.check_file(source)
        if not isinstance(shard, fmt.ShardFile) or region.device.type != "cpu" or not region.is_contiguous() \
                or region.dtype != shard.spans[name][0]:
            return False
        run = self._byte_run(source, name, dim, start, stop)
        if run is None:
            return False
        path, offset, length = run
        if length:
            with open(path, "rb", buffering=0) as file:
                read_exactly(file, [region.detach().reshape(-1).view(torch.uint8).numpy()], offset, "load")
        return True

    def _read_piece(self, source: int, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop along `dim` (all of it when `dim` is None) of saved TP rank `source`'s tensor `name`:
        a view of the memory-mapped file, not a copy."""
        shard = self.check_file(source)
        dtype, shape, offset = shard.spans[name]
        count = math.prod(shape)
        if count == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            if source not in self._mapped:
                with open(shard.path, "rb") as file:
                    self._mapped[source] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            with warnings.catch_warnings():  # read-only memory: the views are only ever read from
                warnings.filterwarnings("ignore", "The given buffer is not writable")
                tensor = torch.frombuffer(self._mapped[source], dtype=dtype, count=count, offset=offset).view(shape)
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)


_HUGE_PAGE_BYTES = 2 * 1024 * 1024
_IOV_MAX = os.sysconf("SC_IOV_MAX")


@functools.cache
def _madvise():
    """libc's madvise (Linux, with transparent huge pages), or None where there is none."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask for transparent huge pages for the whole 2 MiB pages inside a new, not yet touched CPU tensor, so that
    reading into it faults once per 2 MiB instead of once per 4 KiB. A hint: nothing changes where the system has
    no huge pages or refuses."""
    begin = tensor.data_ptr()
    start = -(-begin // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    end = (begin + tensor.numel() * tensor.element_size()) // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    madvise = _madvise()
    if madvise is not None and tensor.device.type == "cpu" and end > start:
        madvise(start, end - start, mmap.MADV_HUGEPAGE)


def read_exactly(file, views: list, offset: int, redo: str) -> None:
    """Fill `views` (writable buffers) in turn with the open file's bytes from `offset` (`preadv`, at most IOV_MAX
    views a call, through short reads); CheckpointCorruptError, saying to `redo` the operation, if the file ends
    first."""
    views = [view for view in (memoryview(buffer).cast("B") for buffer in views) if len(view)]
    first = 0
    while first < len(views):
        count = os.preadv(file.fileno(), views[first:first + _IOV_MAX], offset)
        if not count:
            raise CheckpointCorruptError(f"{file.name} ended while reading it: it changed after it was checked; "
                                         f"{redo} again.")
        offset += count
        while first < len(views) and count >= len(views[first]):
            count -= len(views[first])
            first += 1
        if count:
            views[first] = views[first][count:]
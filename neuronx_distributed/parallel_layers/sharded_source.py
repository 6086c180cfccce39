"""Read a sharded checkpoint as any TP rank of any TP degree sees it.

Sharded tensors are cut from the slices of the source shards that the target
rank needs (`resharding`), in the saved layout (its parts and replicated blocks)
or in a `Target` layout that the model's parameter declares; replicated and
per-rank values, and the state structure, come from the source rank with the
target's index when there is one, else from TP rank 0. Every shard file is
checked against the manifest (`checkpoint_format.check_shard_file`) before
safetensors opens it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..errors import CheckpointCorruptError, CheckpointShapeError, ReshardError
from . import checkpoint_format as fmt
from .resharding import Part, check_divisible, check_parts, logical_size, parts_pieces, read_pieces
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

    def files_read(self, names) -> list[fmt.FileEntry]:
        """The shard files that reading `names` touches."""
        return [self.manifest.files[rank] for rank in self._ranks_read(names)]

    def read(self, name: str, target: Target | None = None) -> torch.Tensor:
        """This rank's tensor `name` (in `target`'s layout when given), cut from the source shards."""
        entry = self.manifest.tensors[name]
        if entry.layout != fmt.SHARDED:
            return self._read_piece(fmt.file_holding(entry, self.source_rank), name, None, 0, 0)
        saved, target = entry.row_parts(), target or self.target(name)
        if (target.parts, target.rank, target.world_size) == (saved, self.source_rank, self.source_world):
            return self._read_piece(self.source_rank, name, None, 0, 0)
        dim = entry.partition_dim
        pieces = parts_pieces(saved, self.source_world, target.parts, target.rank, target.world_size)
        return read_pieces(pieces, dim, lambda source, start, stop: self._read_piece(source, name, dim, start, stop))

    def _read_piece(self, source: int, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        with safe_open(self.check_file(source).path, framework="pt") as file:
            if dim is None:
                return file.get_tensor(name)
            return file.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)].contiguous()

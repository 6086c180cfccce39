"""Read a sharded checkpoint as any TP rank of any TP degree sees it.

Sharded tensors are cut from the slices of the source shards that the target
rank needs (`resharding`); replicated and per-rank values, and the state
structure, come from the source rank with the target's index when there is one,
else from TP rank 0. Every shard file is checked against the manifest
(`checkpoint_format.check_shard_file`) before safetensors opens it.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from ..errors import CheckpointCorruptError, ReshardError
from . import checkpoint_format as fmt
from .resharding import check_divisible, read_shard, shard_shape
from .state_tree import tensor_names


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

    def check_loadable(self, names) -> None:
        """Raise ReshardError for any of `names` that cannot be cut for this TP degree; check the files they are read from."""
        for name in names:
            entry = self.manifest.tensors[name]
            if entry.layout == fmt.LOCAL and self.world_size != self.source_world:
                raise ReshardError(
                    f"'{name}' holds a different value on each of the {self.source_world} TP ranks that saved it and "
                    f"cannot be resharded to TP={self.world_size}; load with TP={self.source_world}. (Optimizer state "
                    "is per-rank when its parameters could not be matched to the model: build the optimizer from "
                    "model.named_parameters() to record the match.)"
                )
            if entry.layout == fmt.SHARDED:
                check_divisible(name, entry.shape, entry.partition_dim, entry.partition_stride, self.world_size)
            for source in self._ranks_read([name]):
                if name not in self.check_file(source).names:
                    raise CheckpointCorruptError(
                        f"{self.check_file(source).path} lacks '{name}', which TP rank {self.source_rank}'s structure names "
                        "and the manifest lists; the checkpoint's files do not belong together: restore it from a copy."
                    )

    def local_shape(self, name: str) -> list[int]:
        """The shape of this rank's tensor `name`."""
        entry = self.manifest.tensors[name]
        if entry.layout == fmt.SHARDED:
            return shard_shape(entry.shape, entry.partition_dim, self.world_size)
        return list(entry.shape)

    def _ranks_read(self, names) -> list[int]:
        ranks = {self.source_rank}
        if any(self.manifest.tensors[name].layout == fmt.SHARDED for name in names) and self.world_size != self.source_world:
            ranks = set(range(self.source_world))
        return sorted(ranks)

    def files_read(self, names) -> list[fmt.FileEntry]:
        """The shard files that reading `names` touches."""
        return [self.manifest.files[rank] for rank in self._ranks_read(names)]

    def read(self, name: str) -> torch.Tensor:
        """This rank's tensor `name`, cut from the source shards."""
        entry = self.manifest.tensors[name]
        if entry.layout != fmt.SHARDED or self.world_size == self.source_world:
            return self._read_piece(self.source_rank, name, None, 0, 0)
        dim = entry.partition_dim
        return read_shard(
            entry.shape,
            dim,
            entry.partition_stride,
            self.source_world,
            self.rank,
            self.world_size,
            lambda source, start, stop: self._read_piece(source, name, dim, start, stop),
        )

    def _read_piece(self, source: int, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        with safe_open(self.check_file(source).path, framework="pt") as file:
            if dim is None:
                return file.get_tensor(name)
            return file.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)].contiguous()

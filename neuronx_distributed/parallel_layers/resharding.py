"""Which slices of which source shards make up a target shard, for any TP degrees N -> M.

The slicing rule is `initialization.shard_of` itself, applied to the indices of
the partitioned dimension: it says which global indices each rank holds and in
what order, so stride > 1 (fused QKV) reshards like stride 1. An unsharded
tensor is a source of TP degree 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ReshardError
from .initialization import shard_of


def check_divisible(name: str, shape: list[int], partition_dim: int, stride: int, world_size: int) -> None:
    """Raise ReshardError unless dim `partition_dim` splits into `stride * world_size` equal blocks."""
    size = shape[partition_dim]
    if size % (stride * world_size) != 0:
        raise ReshardError(
            f"'{name}' has size {size} along its partition dim {partition_dim} (stride {stride}), which does not "
            f"split across {world_size} tensor-parallel ranks; load it with a TP degree d such that "
            f"{stride} * d divides {size}."
        )


def shard_shape(shape: list[int], partition_dim: int, world_size: int) -> list[int]:
    """The shape of one rank's shard of a tensor of global `shape`."""
    local = list(shape)
    local[partition_dim] //= world_size
    return local


def source_pieces(size: int, stride: int, source_world: int, target_rank: int, target_world: int) -> list[tuple[int, int, int]]:
    """(source rank, start, stop) slices of the source shards that, concatenated, give the target shard."""
    indices = torch.arange(size)
    owner = torch.empty(size, dtype=torch.long)
    position = torch.empty(size, dtype=torch.long)
    for rank in range(source_world):
        held = shard_of(indices, 0, stride, rank, source_world)
        owner[held] = rank
        position[held] = torch.arange(held.numel())
    wanted = shard_of(indices, 0, stride, target_rank, target_world)
    owners, positions = owner[wanted].tolist(), position[wanted].tolist()
    pieces: list[tuple[int, int, int]] = []
    for rank, at in zip(owners, positions):
        if pieces and pieces[-1][0] == rank and pieces[-1][2] == at:
            pieces[-1] = (rank, pieces[-1][1], at + 1)
        else:
            pieces.append((rank, at, at + 1))
    return pieces


def read_shard(
    shape: list[int],
    partition_dim: int,
    stride: int,
    source_world: int,
    target_rank: int,
    target_world: int,
    read_piece: Callable[[int, int, int], torch.Tensor],
) -> torch.Tensor:
    """Target rank's shard of a tensor of global `shape`, from `read_piece(source rank, start, stop)`.

    `read_piece` returns rows start:stop (along `partition_dim`) of that source rank's shard.
    """
    pieces = source_pieces(shape[partition_dim], stride, source_world, target_rank, target_world)
    parts = [read_piece(rank, start, stop) for rank, start, stop in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=partition_dim)

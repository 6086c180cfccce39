"""How a shard maps onto the full tensor, and which slices of which source shards make up a target shard.

Along its partition dim a sharded tensor is a run of parts (`Part`), each split
contiguously across the TP ranks; a rank's shard is its slice of every part, in
order. A plain shard is one part; `stride` s (fused QKV of equal sizes) is s equal
parts, which is `initialization.shard_of`'s rule; a fused GQA weight is parts of
different sizes. A part may also store each block of rows (a KV head) several times
in a row, so that more ranks than there are heads each hold the head they need: its
stored (replicated) rows then map onto fewer logical rows of the model's tensor.

Resharding maps rows through the logical tensor: each row a target rank needs is read
from the first stored copy of its logical row, for any TP degrees N -> M and any
replication on either side. An unsharded tensor is a source of TP degree 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import CheckpointShapeError, ReshardError

PARTS_ATTRIBUTE = "partition_parts"


@dataclass(frozen=True)
class Part:
    """`size` stored rows along the partition dim: logical blocks of `block` rows, each stored `replication` times in a row."""

    size: int
    replication: int = 1
    block: int = 1

    @property
    def logical_size(self) -> int:
        return self.size // self.replication


def set_partition_parts(param: torch.Tensor, parts: Sequence[Part]) -> None:
    """Declare that `param`'s partition dim is made of `parts` (sizes in the stored full tensor).

    The attribute holds each part as a plain `(size, replication, block)` tuple of ints,
    so that a tensor carrying it (a state dict's, see `utils.copy_attributes_to_state_dict`)
    saved with `torch.save` loads with `torch.load(weights_only=True)`.
    """
    setattr(param, PARTS_ATTRIBUTE, tuple((part.size, part.replication, part.block) for part in parts))


def partition_parts(tensor: torch.Tensor) -> tuple[Part, ...] | None:
    """The parts `tensor` declares, or None for a plain shard (described by its partition stride)."""
    parts = getattr(tensor, PARTS_ATTRIBUTE, None)
    return None if parts is None else tuple(Part(*part) for part in parts)


def stride_parts(size: int, stride: int) -> tuple[Part, ...]:
    """The parts of a tensor of `size` rows sharded with `stride`: `stride` equal, unreplicated parts."""
    return (Part(size // stride),) * stride


def replicated(parts: Sequence[Part]) -> bool:
    return any(part.replication > 1 for part in parts)


def logical_size(parts: Sequence[Part]) -> int:
    return sum(part.logical_size for part in parts)


def local_rows(parts: Sequence[Part], rank: int, world_size: int) -> torch.Tensor:
    """The stored rows that rank `rank` of `world_size` holds, in the order of its shard."""
    rows, offset = [], 0
    for part in parts:
        per_rank = part.size // world_size
        rows.append(torch.arange(offset + rank * per_rank, offset + (rank + 1) * per_rank))
        offset += part.size
    return torch.cat(rows)


def logical_rows(parts: Sequence[Part]) -> torch.Tensor:
    """The logical row that each stored row holds."""
    rows, offset = [], 0
    for part in parts:
        index = torch.arange(part.size)
        rows.append(offset + index // (part.block * part.replication) * part.block + index % part.block)
        offset += part.logical_size
    return torch.cat(rows)


def local_logical_rows(parts: Sequence[Part], rank: int, world_size: int) -> torch.Tensor:
    """The logical rows of rank `rank`'s shard, in order."""
    return logical_rows(parts)[local_rows(parts, rank, world_size)]


def first_copies(parts: Sequence[Part]) -> torch.Tensor:
    """For each logical row, the stored row of its first copy."""
    stored = logical_rows(parts)
    first = torch.full((logical_size(parts),), len(stored), dtype=torch.long)
    return first.scatter_reduce(0, stored, torch.arange(len(stored)), "amin")


def check_parts(name: str, parts: Sequence[Part], world_size: int) -> None:
    """Raise ReshardError unless every part splits into `world_size` equal slices."""
    for part in parts:
        if part.size % world_size != 0:
            replicas = f", {part.replication} copies of each block of {part.block}" if part.replication > 1 else ""
            raise ReshardError(
                f"'{name}' has a part of {part.size} rows{replicas}, which does not split across {world_size} "
                f"tensor-parallel ranks; load it with a TP degree that divides {part.size}"
                + (" (or into layers built with a kv_size_multiplier that fits that degree)." if replicas else ".")
            )


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


def parts_pieces(
    source_parts: Sequence[Part], source_world: int, target_parts: Sequence[Part], target_rank: int, target_world: int
) -> list[tuple[int, int, int]]:
    """(source rank, start, stop) slices of the source shards that, concatenated, give the target shard.

    Both sides must hold the same logical tensor (`logical_size` equal).
    """
    if not replicated(source_parts) and not replicated(target_parts) and \
            [part.size for part in source_parts] == [part.size for part in target_parts] and \
            all(part.size % source_world == 0 and part.size % target_world == 0 for part in source_parts):
        return _plain_pieces([part.size for part in source_parts], source_world, target_rank, target_world)
    stored_size = sum(part.size for part in source_parts)
    owner = torch.empty(stored_size, dtype=torch.long)
    position = torch.empty(stored_size, dtype=torch.long)
    for rank in range(source_world):
        held = local_rows(source_parts, rank, source_world)
        owner[held] = rank
        position[held] = torch.arange(held.numel())
    wanted = first_copies(source_parts)[local_logical_rows(target_parts, target_rank, target_world)]
    ranks, rows = owner[wanted], position[wanted]
    if not len(rows):
        return []
    # A piece ends where the next row comes from another rank or is not the next row of the same shard.
    ends = torch.nonzero((ranks[1:] != ranks[:-1]) | (rows[1:] != rows[:-1] + 1)).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), ends])
    ends = torch.cat([ends, torch.tensor([len(rows)])])
    return list(zip(ranks[starts].tolist(), rows[starts].tolist(), (rows[ends - 1] + 1).tolist()))


def _plain_pieces(sizes: list[int], source_world: int, target_rank: int, target_world: int) -> list[tuple[int, int, int]]:
    """`parts_pieces` where both sides are the same unreplicated parts of `sizes` rows: by interval arithmetic."""
    pieces: list[tuple[int, int, int]] = []
    held_before = 0  # rows of the earlier parts in each source shard
    for size in sizes:
        per_source, per_target = size // source_world, size // target_world
        first, end = target_rank * per_target, (target_rank + 1) * per_target
        while first < end:
            rank = first // per_source
            stop = min(end, (rank + 1) * per_source)
            start_at = held_before + first - rank * per_source
            if pieces and pieces[-1][0] == rank and pieces[-1][2] == start_at:
                pieces[-1] = (rank, pieces[-1][1], start_at + stop - first)
            else:
                pieces.append((rank, start_at, start_at + stop - first))
            first = stop
        held_before += per_source
    return pieces


def source_pieces(size: int, stride: int, source_world: int, target_rank: int, target_world: int) -> list[tuple[int, int, int]]:
    """`parts_pieces` for a plain tensor of `size` rows sharded with `stride` on both sides."""
    parts = stride_parts(size, stride)
    return parts_pieces(parts, source_world, parts, target_rank, target_world)


def read_pieces(pieces, partition_dim: int, read_piece: Callable[[int, int, int], torch.Tensor]) -> torch.Tensor:
    """The concatenation along `partition_dim` of `read_piece(source rank, start, stop)` for each piece."""
    parts = [read_piece(rank, start, stop) for rank, start, stop in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=partition_dim)


def read_shard(
    shape: list[int],
    partition_dim: int,
    stride: int,
    source_world: int,
    target_rank: int,
    target_world: int,
    read_piece: Callable[[int, int, int], torch.Tensor],
) -> torch.Tensor:
    """Target rank's shard of a plain tensor of global `shape`, from `read_piece(source rank, start, stop)`.

    `read_piece` returns rows start:stop (along `partition_dim`) of that source rank's shard.
    """
    pieces = source_pieces(shape[partition_dim], stride, source_world, target_rank, target_world)
    return read_pieces(pieces, partition_dim, read_piece)


def logical_parts(parts: Sequence[Part]) -> tuple[Part, ...]:
    """`parts` with each block stored once: the layout of the model's (logical) tensor."""
    return tuple(Part(part.logical_size) for part in parts)


def parts_weight_loader(parts: Sequence[Part], rank: int, world_size: int, partition_dim: int = 0):
    """A `weight_loading` loader: rank `rank`'s shard of a parameter made of `parts`, from the full logical tensor."""
    size = logical_size(parts)

    def load(full_shape, read):
        if len(full_shape) <= partition_dim or full_shape[partition_dim] != size:
            raise CheckpointShapeError(
                f"the checkpoint tensor has shape {tuple(full_shape)}, but this parameter shards a tensor of {size} "
                f"rows along dim {partition_dim}; load the checkpoint of the model this layer was built for."
            )
        pieces = parts_pieces(logical_parts(parts), 1, parts, rank, world_size)
        return read_pieces(pieces, partition_dim, lambda _, start, stop: read(partition_dim, start, stop))

    return load


def replica_pieces(shard: torch.Tensor, parts: Sequence[Part] | None, world_size: int, partition_dim: int = 0):
    """`shard` cut into its parts: (piece, how many copies of each of its rows the TP group holds)."""
    if parts is None or not replicated(parts):
        return [(shard, 1)]
    pieces = shard.split([part.size // world_size for part in parts], dim=partition_dim)
    return list(zip(pieces, [part.replication for part in parts]))

"""Initialize a full master weight, then keep this rank's shard of it.

With the same seed, the shards at TP=N are exactly the slices of the TP=1
weights, and TP=1 equals torch.nn.Linear / torch.nn.Embedding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.nn import init


def linear_weight_init(weight: torch.Tensor) -> None:
    """torch.nn.Linear's weight initialization."""
    init.kaiming_uniform_(weight, a=math.sqrt(5))


def linear_bias_init(bias: torch.Tensor, fan_in: int) -> None:
    """torch.nn.Linear's bias initialization."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    init.uniform_(bias, -bound, bound)


def shard_of(master: torch.Tensor, partition_dim: int, stride: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's shard of `master` along `partition_dim`.

    With `stride` > 1 the dim is cut into `stride * world_size` blocks and rank r
    keeps blocks r, r + world_size, ... (for fused weights such as QKV).
    """
    if world_size == 1:
        return master.clone()
    block = master.shape[partition_dim] // (stride * world_size)
    blocks = torch.split(master, block, dim=partition_dim)
    return torch.cat(blocks[rank::world_size], dim=partition_dim).contiguous()


def initialized_master(
    full_shape: tuple[int, ...], initializer: Callable[[torch.Tensor], object], dtype: torch.dtype, device
) -> torch.Tensor:
    """A tensor of `full_shape` initialized with `initializer` (the master that every rank shards)."""
    master = torch.empty(full_shape, dtype=dtype, device=device)
    with torch.no_grad():
        initializer(master)
    return master

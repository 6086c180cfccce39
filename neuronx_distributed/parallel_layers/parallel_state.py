"""The tensor-parallel x data-parallel topology of the job and its getters.

Ranks are laid out with tensor-parallel (TP) groups of contiguous ranks and
data-parallel (DP) groups striding across them: with 4 ranks and TP=2 the TP
groups are [0, 1] and [2, 3], the DP groups [0, 2] and [1, 3].
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import (
    ModelParallelAlreadyInitializedError,
    ModelParallelNotInitializedError,
    ParallelSizeError,
)


@dataclass(frozen=True)
class _Topology:
    tensor_parallel_size: int
    tensor_parallel_groups: list[list[int]]
    data_parallel_groups: list[list[int]]
    tensor_parallel_group: dist.ProcessGroup
    data_parallel_group: dist.ProcessGroup
    tensor_parallel_rank: int
    data_parallel_rank: int


_topology: _Topology | None = None


def tensor_parallel_rank_lists(world_size: int, tensor_parallel_size: int) -> list[list[int]]:
    """Every TP group as a list of global ranks: contiguous blocks of `tensor_parallel_size`."""
    return [list(range(start, start + tensor_parallel_size)) for start in range(0, world_size, tensor_parallel_size)]


def data_parallel_rank_lists(world_size: int, tensor_parallel_size: int) -> list[list[int]]:
    """Every DP group as a list of global ranks: one rank of each TP group, same TP rank."""
    return [list(range(tp_rank, world_size, tensor_parallel_size)) for tp_rank in range(tensor_parallel_size)]


def _ensure_default_process_group() -> None:
    """Initialize torch.distributed from torchrun's environment, or as a world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    else:
        # A plain `python script.py`: a single-process world, so the same code runs unlaunched.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def initialize_model_parallel(tensor_model_parallel_size: int = 1) -> None:
    """Split the world into TP groups of `tensor_model_parallel_size` ranks and DP groups across them.

    Initializes the default process group first when none exists: from torchrun's
    environment variables, or as a single-process world when they are absent.
    Calling it again with the same size does nothing; with another size it raises
    until `destroy_model_parallel` is called.
    """
    global _topology
    if not isinstance(tensor_model_parallel_size, int) or tensor_model_parallel_size < 1:
        raise ParallelSizeError(
            f"tensor_model_parallel_size must be a positive int, got {tensor_model_parallel_size!r}."
        )
    if _topology is not None:
        if _topology.tensor_parallel_size == tensor_model_parallel_size:
            return
        raise ModelParallelAlreadyInitializedError(
            f"model parallelism is already initialized with tensor_model_parallel_size="
            f"{_topology.tensor_parallel_size}; call destroy_model_parallel() before initializing "
            f"with {tensor_model_parallel_size}."
        )
    _ensure_default_process_group()
    world_size = dist.get_world_size()
    if world_size % tensor_model_parallel_size != 0:
        raise ParallelSizeError(
            f"tensor_model_parallel_size={tensor_model_parallel_size} does not divide the world size "
            f"{world_size}; choose a TP degree that divides the number of processes."
        )
    rank = dist.get_rank()
    tp_lists = tensor_parallel_rank_lists(world_size, tensor_model_parallel_size)
    dp_lists = data_parallel_rank_lists(world_size, tensor_model_parallel_size)
    # new_group must be called by every rank for every group, in the same order.
    tp_group = _own_group(tp_lists, rank)
    dp_group = _own_group(dp_lists, rank)
    _topology = _Topology(
        tensor_parallel_size=tensor_model_parallel_size,
        tensor_parallel_groups=tp_lists,
        data_parallel_groups=dp_lists,
        tensor_parallel_group=tp_group,
        data_parallel_group=dp_group,
        tensor_parallel_rank=rank % tensor_model_parallel_size,
        data_parallel_rank=rank // tensor_model_parallel_size,
    )


def _own_group(rank_lists: list[list[int]], rank: int) -> dist.ProcessGroup:
    own = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if rank in ranks:
            own = group
    return own


def model_parallel_is_initialized() -> bool:
    """True between `initialize_model_parallel` and `destroy_model_parallel`."""
    return _topology is not None


def destroy_model_parallel() -> None:
    """Forget the TP and DP groups so that `initialize_model_parallel` can be called again."""
    global _topology
    if _topology is None:
        return
    for group in {_topology.tensor_parallel_group, _topology.data_parallel_group}:
        dist.destroy_process_group(group)
    _topology = None


def _require() -> _Topology:
    if _topology is None:
        raise ModelParallelNotInitializedError(
            "model parallelism is not initialized; call "
            "neuronx_distributed.parallel_state.initialize_model_parallel(tensor_model_parallel_size=N) first."
        )
    return _topology


def get_tensor_model_parallel_size() -> int:
    """Number of ranks in this rank's TP group."""
    return _require().tensor_parallel_size


def get_tensor_model_parallel_rank() -> int:
    """This rank's position in its TP group."""
    return _require().tensor_parallel_rank


def get_tensor_model_parallel_group(as_list: bool = False):
    """This rank's TP process group, or with `as_list=True` every TP group as rank lists."""
    topology = _require()
    return [list(g) for g in topology.tensor_parallel_groups] if as_list else topology.tensor_parallel_group


def get_data_parallel_size() -> int:
    """Number of model replicas: world size divided by the TP size."""
    topology = _require()
    return len(topology.data_parallel_groups[0])


def get_data_parallel_rank() -> int:
    """This rank's position in its DP group (the index of its model replica)."""
    return _require().data_parallel_rank


def get_data_parallel_group(as_list: bool = False):
    """This rank's DP process group, or with `as_list=True` every DP group as rank lists."""
    topology = _require()
    return [list(g) for g in topology.data_parallel_groups] if as_list else topology.data_parallel_group


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group."""
    topology = _require()
    return dist.get_rank() - topology.tensor_parallel_rank


# Aliases used by the seed's own snippets.
get_tensor_parallel_size = get_tensor_model_parallel_size
get_data_parallel_world_size = get_data_parallel_size
get_tensor_model_parallel_world_size = get_tensor_model_parallel_size

"""The tensor-parallel x data-parallel topology of the job and its getters.

Ranks are laid out with tensor-parallel (TP) groups of contiguous ranks and
data-parallel (DP) groups striding across them: with 4 ranks and TP=2 the TP
groups are [0, 1] and [2, 3], the DP groups [0, 2] and [1, 3]. Pipeline, context
and expert parallelism are not implemented: their degree is 1, and the getters
that upstream scripts call for them answer accordingly.
"""

from __future__ import annotations

import json
import numbers
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import comm
from ..errors import (
    CollectiveError,
    ModelParallelAlreadyInitializedError,
    ModelParallelNotInitializedError,
    ParallelSizeError,
    UnsupportedParallelismError,
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
    # With CUDA: NCCL for device tensors, gloo for the host tensors that checkpoint agreement and
    # CPU-side collectives exchange (a plain "nccl" world has no backend for those).
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    else:
        # A plain `python script.py`: a single-process world, so the same code runs unlaunched.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    skip_collective_init: bool = False,
    lnc_size: int = 1,
    context_parallel_size: int = 1,
) -> None:
    """Split the world into TP groups of `tensor_model_parallel_size` ranks and DP groups across them.

    Initializes the default process group first when none exists: from torchrun's
    environment variables, or as a single-process world when they are absent.
    Calling it again with the same arguments does nothing; with others it raises
    until `destroy_model_parallel` is called.

    Every rank must pass the same arguments: the ranks compare them first (through
    torch.distributed's store, waiting as long as its timeout for every rank to
    call) and all raise ParallelSizeError naming each rank's values if they differ,
    where upstream would hang in the next collective. Likewise a TP size that does
    not divide the world raises, where upstream silently shrinks it to the world size.

    `pipeline_model_parallel_size`, `context_parallel_size` and
    `expert_model_parallel_size` must be 1 (UnsupportedParallelismError otherwise).
    Neuron-only arguments, accepted and checked for type: `skip_collective_init`
    skips upstream's warm-up all-reduce that initializes Neuron collectives (there
    is none here; the argument check above still runs, it is what keeps a wrong
    call from hanging); `lnc_size` is the logical NeuronCore size that picks
    upstream's replica-group layout on trn2, while TP groups here are always
    contiguous ranks.
    """
    global _topology
    sizes = {
        "tensor_model_parallel_size": tensor_model_parallel_size,
        "pipeline_model_parallel_size": pipeline_model_parallel_size,
        "context_parallel_size": context_parallel_size,
        "expert_model_parallel_size": expert_model_parallel_size,
        "lnc_size": lnc_size,
    }
    arguments = {**sizes, "skip_collective_init": skip_collective_init}
    _ensure_default_process_group()
    _require_same_call_on_every_rank(arguments)
    for name, value in sizes.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ParallelSizeError(f"{name} must be a positive int, got {value!r}.")
    if not isinstance(skip_collective_init, bool):
        raise ParallelSizeError(f"skip_collective_init must be True or False, got {skip_collective_init!r}.")
    for name in ("pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size"):
        if sizes[name] != 1:
            raise UnsupportedParallelismError(
                f"{name}={sizes[name]} is not supported yet: this library implements tensor and data "
                f"parallelism only; pass {name}=1 and use the ranks for tensor_model_parallel_size or "
                "data parallelism."
            )
    tensor_model_parallel_size = int(tensor_model_parallel_size)
    if _topology is not None:
        if _topology.tensor_parallel_size == tensor_model_parallel_size:
            return
        raise ModelParallelAlreadyInitializedError(
            f"model parallelism is already initialized with tensor_model_parallel_size="
            f"{_topology.tensor_parallel_size}; call destroy_model_parallel() before initializing "
            f"with {tensor_model_parallel_size}."
        )
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
    # Each group's collective engines are set up now (collective over it), in the same order on every rank.
    for group in (tp_group, dp_group, dist.group.WORLD):
        comm.set_up(group)


# initialize_model_parallel calls made by this process: the ranks match their calls up by this count.
_calls_made = 0


def _require_same_call_on_every_rank(arguments: dict) -> None:
    """Raise on every rank, before any group exists, unless all ranks passed `arguments` alike.

    Each rank also says which TP size it is already initialized with, so that a call that is a
    no-op on some ranks and builds groups on others raises instead of leaving the latter waiting.
    """
    global _calls_made
    world_size = dist.get_world_size()
    if world_size == 1:
        return
    _calls_made += 1
    mine = {name: repr(value) for name, value in arguments.items()}
    mine["initialized with tensor_model_parallel_size"] = repr(
        _topology.tensor_parallel_size if _topology is not None else None
    )
    store = dist.distributed_c10d._get_default_store()
    keys = [f"nxd/initialize_model_parallel/{_calls_made}/{rank}" for rank in range(world_size)]
    store.set(keys[dist.get_rank()], json.dumps(mine))
    try:
        store.wait(keys)
    except RuntimeError as error:  # DistStoreError: the store's timeout passed
        missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
        raise CollectiveError(
            f"ranks {missing} did not call initialize_model_parallel (call {_calls_made} of this process) within "
            f"the store's timeout of {store.timeout}; every rank must call it, the same number of times."
        ) from error
    every = [json.loads(store.get(key)) for key in keys]
    differing = [name for name in mine if any(values[name] != mine[name] for values in every)]
    if not differing:
        return
    described = []
    for name in differing:
        ranks_by_value = defaultdict(list)
        for rank, values in enumerate(every):
            ranks_by_value[values[name]].append(rank)
        described.append(
            f"{name} is " + "; ".join(f"{value} on ranks {ranks}" for value, ranks in ranks_by_value.items())
        )
    only_state_differs = differing == ["initialized with tensor_model_parallel_size"]
    raise (ModelParallelAlreadyInitializedError if only_state_differs else ParallelSizeError)(
        "ranks called initialize_model_parallel differently: " + ", ".join(described) + ". Every rank must pass "
        "the same arguments (and call destroy_model_parallel() alike before initializing again)."
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
    return get_tensor_model_parallel_replica_groups() if as_list else _require().tensor_parallel_group


def get_tensor_model_parallel_replica_groups() -> list[list[int]]:
    """Every TP group of the job as a list of global ranks (the whole mesh, not only this rank's)."""
    return [list(ranks) for ranks in _require().tensor_parallel_groups]


def get_data_parallel_size() -> int:
    """Number of model replicas: world size divided by the TP size."""
    topology = _require()
    return len(topology.data_parallel_groups[0])


def get_data_parallel_rank() -> int:
    """This rank's position in its DP group (the index of its model replica)."""
    return _require().data_parallel_rank


def get_data_parallel_group(as_list: bool = False):
    """This rank's DP process group, or with `as_list=True` every DP group as rank lists."""
    return get_data_parallel_replica_groups() if as_list else _require().data_parallel_group


def get_data_parallel_replica_groups() -> list[list[int]]:
    """Every DP group of the job as a list of global ranks (the whole mesh, not only this rank's)."""
    return [list(ranks) for ranks in _require().data_parallel_groups]


def get_data_parallel_src_rank() -> int:
    """Global rank of DP rank 0 in this rank's DP group (the replica that holds the same TP shard)."""
    return _require().data_parallel_groups[get_tensor_model_parallel_rank()][0]


def get_world_group(as_list: bool = False):
    """The process group of every rank, or with `as_list=True` its ranks as one rank list."""
    _require()
    return [list(range(dist.get_world_size()))] if as_list else dist.group.WORLD


def get_pipeline_model_parallel_size() -> int:
    """Number of pipeline stages: always 1 (pipeline parallelism is not implemented)."""
    _require()
    return 1


def get_pipeline_model_parallel_rank() -> int:
    """This rank's pipeline stage: always 0 (pipeline parallelism is not implemented)."""
    _require()
    return 0


def get_pipeline_model_parallel_replica_groups() -> list[list[int]]:
    """Every pipeline group as rank lists: with one stage, each rank alone."""
    _require()
    return [[rank] for rank in range(dist.get_world_size())]


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group."""
    topology = _require()
    return dist.get_rank() - topology.tensor_parallel_rank


# Aliases used by the seed's own snippets.
get_tensor_parallel_size = get_tensor_model_parallel_size
get_data_parallel_world_size = get_data_parallel_size
get_tensor_model_parallel_world_size = get_tensor_model_parallel_size


comm.set_default_group(get_tensor_model_parallel_group)

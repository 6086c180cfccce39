"""The engine interface of `comm` and the torch.distributed engine.

An engine runs collectives on contiguous tensors laid out along dim 0; the public
functions in `comm.collectives` take care of other dims, validation and dispatch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (now deprecated) to the *_single names;
# torch before 2.13 (the GPU image's 2.11 among them) has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Engine(Protocol):
    """What `comm` needs of a collective engine. All tensors are contiguous."""

    name: str

    def all_reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> None:
        """Reduce `tensor` over the group in place."""

    def all_gather(self, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """Return a (group size, *tensor.shape) tensor, row r from group rank r."""

    def reduce_scatter(self, tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> torch.Tensor:
        """`tensor` is (group size, *chunk); return this rank's reduced chunk."""

    def broadcast_(self, tensor: torch.Tensor, group_src: int, group: dist.ProcessGroup) -> None:
        """Overwrite `tensor` in place with group rank `group_src`'s copy."""

    def barrier(self, group: dist.ProcessGroup) -> None:
        """Return once every rank of the group has entered."""

    def supports(self, tensor: torch.Tensor, group: dist.ProcessGroup) -> bool:
        """Whether this engine can run a collective on `tensor` over `group`."""


class SharedMemoryEngine(Engine, Protocol):
    """An engine that serves only some groups (those on one host) and some tensors, and can tell
    the peers of a group it serves that this rank runs a call elsewhere (see `comm.collectives`)."""

    def serves(self, group: dist.ProcessGroup) -> bool:
        """Whether the engine runs this group's collectives; the same answer on all its ranks."""

    def announce_elsewhere(
        self, group: dist.ProcessGroup, collective: str, reason: str, count: int, op: dist.ReduceOp, root: int
    ) -> None:
        """Publish that this rank does not run `collective` here; raise CollectiveError if a peer does."""


class TorchEngine:
    """Collectives through torch.distributed: gloo on CPU, NCCL on CUDA, any host layout."""

    name = "torch"

    def all_reduce_(self, tensor, op, group):
        dist.all_reduce(tensor, op=op, group=group)

    def all_gather(self, tensor, group):
        world = dist.get_world_size(group)
        out = tensor.new_empty(world * tensor.numel())
        _all_gather_single(out, tensor.reshape(-1), group=group)
        return out.view(world, *tensor.shape)

    def reduce_scatter(self, tensor, op, group):
        out = tensor.new_empty(tensor.shape[1:])
        _reduce_scatter_single(out.view(-1), tensor.view(-1), op=op, group=group)
        return out

    def broadcast_(self, tensor, group_src, group):
        dist.broadcast(tensor, src=dist.get_global_rank(group, group_src), group=group)

    def barrier(self, group):
        dist.barrier(group=group)

    def supports(self, tensor, group):
        return True

"""The engine interface of `comm` and the torch.distributed engine.

An engine is bound to one process group when `comm.groups` sets the group up, and runs
collectives on contiguous tensors laid out along dim 0; the public functions in
`comm.collectives` take care of other dims, validation and dispatch.
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
    """What `comm` needs of a collective engine bound to a group. All tensors are contiguous."""

    name: str

    def all_reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp) -> None:
        """Reduce `tensor` over the group in place."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return a (group size, *tensor.shape) tensor, row r from group rank r."""

    def reduce_scatter(self, tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        """`tensor` is (group size, *chunk); return this rank's reduced chunk."""

    def broadcast_(self, tensor: torch.Tensor, group_src: int) -> None:
        """Overwrite `tensor` in place with group rank `group_src`'s copy."""

    def barrier(self) -> None:
        """Return once every rank of the group has entered."""


class TorchEngine:
    """Collectives through torch.distributed: gloo on CPU, NCCL on CUDA, any host layout."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self._size = group.size()
        self._rank = group.rank()
        self._global_ranks = dist.get_process_group_ranks(group)
        self._gloo = dist.get_backend(group) == "gloo"

    def all_reduce_(self, tensor, op):
        dist.all_reduce(tensor, op=op, group=self.group)

    def all_gather(self, tensor):
        if self._gloo and tensor.device.type == "cpu":
            # gloo's all-gather is slower than one broadcast from each rank (4 processes on one
            # host, 2026-12: 25 MB in 243 ms vs 153 ms, 100 MB in 842 vs 584 ms; 2 processes,
            # 100 MB: 682 vs 292 ms), so on gloo every rank broadcasts its row in turn.
            stacked = tensor.new_empty(self._size, *tensor.shape)
            stacked[self._rank].copy_(tensor)
            for src in range(self._size):
                self.broadcast_(stacked[src], src)
            return stacked
        out = tensor.new_empty(self._size * tensor.numel())
        _all_gather_single(out, tensor.reshape(-1), group=self.group)
        return out.view(self._size, *tensor.shape)

    def reduce_scatter(self, tensor, op):
        if self._gloo and tensor.device.type == "cpu":
            # gloo's reduce-scatter is slower than its all-reduce (4 processes on one host,
            # 2026-12: 100 MB in 1098 ms vs 985 ms, 8 MB in 92 vs 70 ms; 2 processes, 100 MB:
            # 726 vs 684 ms), so on gloo: all-reduce a copy (never the caller's tensor) and keep this rank's row.
            reduced = tensor.clone()
            self.all_reduce_(reduced, op)
            return reduced[self._rank].clone()
        out = tensor.new_empty(tensor.shape[1:])
        _reduce_scatter_single(out.view(-1), tensor.view(-1), op=op, group=self.group)
        return out

    def broadcast_(self, tensor, group_src):
        dist.broadcast(tensor, src=self._global_ranks[group_src], group=self.group)

    def barrier(self):
        dist.barrier(group=self.group)

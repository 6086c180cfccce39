"""The shared-memory engine: the `Engine` that `comm` picks for CPU tensors when every rank
of the group runs on this host. Collectives run in the C++ core (`neuronx_distributed._C`)
through the custom ops of `shm_ops`; a dead or stalled peer raises CollectiveError naming
the group and the rank after the timeout (`set_timeout`, or NXD_COMM_TIMEOUT in seconds).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import shm_ops

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_OP_NAMES = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.MAX: "max"}


class ShmEngine:
    """Collectives through per-group shared-memory segments, for ranks of one host."""

    name = "shm"

    def supports(self, tensor: torch.Tensor, group: dist.ProcessGroup) -> bool:
        """CPU tensor of a supported dtype, and every rank of `group` on this host (`runs` and `serves`).

        The first call for a group with such a tensor is collective over it (see `serves`).
        """
        return self.runs(tensor) and self.serves(group)

    def serves(self, group: dist.ProcessGroup) -> bool:
        """Whether every rank of `group` is on this host: the same answer on every rank of the group.

        The first call for a group is collective over it (the ranks exchange host identities).
        """
        return shm_ops.groups.handle(group) is not None

    @staticmethod
    def runs(tensor: torch.Tensor) -> bool:
        """Whether the engine runs collectives on `tensor`: a CPU tensor of a supported dtype."""
        return tensor.device.type == "cpu" and tensor.dtype in SUPPORTED_DTYPES

    def announce_elsewhere(self, group, collective: str, reason: str, count: int, op, root: int) -> None:
        """Tell the group's ranks in one step that this rank does not run `collective` here.

        `reason` is "other_engine" (it runs on torch.distributed) or "invalid_input" (this rank
        raises for its input). Raises CollectiveError on every rank if a peer runs the step on
        shared memory instead; returns if every rank announced the same.
        """
        shm_ops.announce_elsewhere(group.group_name, collective, reason, count, _OP_NAMES[op], root)

    def all_reduce_(self, tensor, op, group):
        torch.ops.nxd.shm_all_reduce_.default(tensor, _OP_NAMES[op], group.group_name)

    def all_gather(self, tensor, group):
        return torch.ops.nxd.shm_all_gather.default(tensor, dist.get_world_size(group), group.group_name)

    def reduce_scatter(self, tensor, op, group):
        return torch.ops.nxd.shm_reduce_scatter.default(tensor, _OP_NAMES[op], group.group_name)

    def broadcast_(self, tensor, group_src, group):
        torch.ops.nxd.shm_broadcast_.default(tensor, group_src, group.group_name)

    def barrier(self, group):
        shm_ops.barrier(group.group_name)

    @staticmethod
    def set_timeout(seconds: float) -> None:
        """Seconds a rank waits for a dead or stalled peer before its collective fails."""
        shm_ops.groups.set_timeout(seconds)

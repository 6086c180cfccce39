"""The shared-memory engine of one process group: the `Engine` that `comm` picks for CPU
tensors of the dtypes below when every rank of the group runs on this host.

`ShmEngine` calls the group's C++ handle (`neuronx_distributed._C.ShmGroup`) directly: the
eager path. `ShmOpEngine` runs the same collectives through the custom ops of `shm_ops`,
which torch.compile and torch.export see. A dead or stalled peer raises CollectiveError
naming the group and the rank after the timeout (`comm.set_backend(timeout_s=...)`).

No rank is left waiting for a peer that went elsewhere: on a group that shared memory
serves, a rank whose call runs on torch.distributed (`AnnouncingEngine`: a dtype or device
that shared memory does not run) or raises (`RefusingEngine`, `announce_refusal`: its input,
or `shm` forced for what shared memory cannot run) says so in one shared-memory step first,
and a peer that chose shared memory for that call fails at once with CollectiveError, as
does this rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.dlpack import to_dlpack

from ..errors import CollectiveError, NeuronxDistributedError
from .engine import TorchEngine
from .native import _C

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# A lookup with a ReduceOp key costs 0.5-1 us (its hash and == are bound C++ calls); op_name, tens of ns.
_SUM, _MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX


def op_name(op: dist.ReduceOp) -> str:
    """The engine's name of `op`, one of the two objects that `comm` resolves every op to, told apart by
    identity."""
    if op is _SUM:
        return "sum"
    if op is _MAX:
        return "max"
    raise ValueError(f"reduce op {op!r} is neither ReduceOp.SUM nor ReduceOp.MAX")


def runs(tensor: torch.Tensor) -> bool:
    """Whether shared memory runs collectives on `tensor`: a CPU tensor of a supported dtype."""
    return tensor.device.type == "cpu" and tensor.dtype in SUPPORTED_DTYPES


class ShmEngine:
    """Eager collectives of one group through its shared-memory segment (the C++ calls, no dispatcher)."""

    name = "shm"

    def __init__(self, group: dist.ProcessGroup, handle: _C.ShmGroup):
        self.group = group
        self.handle = handle
        self._size = group.size()

    def all_reduce_(self, tensor, op):
        try:
            self.handle.all_reduce(to_dlpack(tensor), op_name(op))
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure

    def all_gather(self, tensor):
        out = tensor.new_empty((self._size, *tensor.shape))
        try:
            self.handle.all_gather(to_dlpack(tensor), to_dlpack(out))
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure
        return out

    def reduce_scatter(self, tensor, op):
        out = tensor.new_empty(tensor.shape[1:])
        try:
            self.handle.reduce_scatter(to_dlpack(tensor), to_dlpack(out), op_name(op))
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure
        return out

    def broadcast_(self, tensor, group_src):
        try:
            self.handle.broadcast(to_dlpack(tensor), group_src)
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure

    def barrier(self):
        try:
            self.handle.barrier()
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure

    def announce_refusal(self, collective: str, count: int, op, root: int, error: NeuronxDistributedError):
        """Tell the peers that this rank raises `error` for its input of `collective`, then raise it."""
        try:
            self._announce(collective, "invalid_input", count, op, root)
        except CollectiveError as disagreement:
            raise error from disagreement
        raise error

    def announce_elsewhere(self, collective: str, count: int, op, root: int) -> None:
        """Tell the peers in one step that this rank runs `collective` on torch.distributed;
        CollectiveError on every rank if a peer runs that step on shared memory instead."""
        self._announce(collective, "other_engine", count, op, root)

    def _announce(self, collective, reason, count, op, root):
        try:
            self.handle.announce_elsewhere(collective, reason, count, op_name(op), root)
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure


class ShmOpEngine:
    """The same collectives through `torch.ops.nxd.shm_*`: what torch.compile and torch.export record."""

    name = "shm"

    def __init__(self, group: dist.ProcessGroup):
        self._size = group.size()
        self._group_name = group.group_name

    def all_reduce_(self, tensor, op):
        torch.ops.nxd.shm_all_reduce_.default(tensor, op_name(op), self._group_name)

    def all_gather(self, tensor):
        return torch.ops.nxd.shm_all_gather.default(tensor, self._size, self._group_name)

    def reduce_scatter(self, tensor, op):
        return torch.ops.nxd.shm_reduce_scatter.default(tensor, op_name(op), self._group_name)

    def broadcast_(self, tensor, group_src):
        torch.ops.nxd.shm_broadcast_.default(tensor, group_src, self._group_name)


class AnnouncingEngine:
    """torch.distributed for a group that shared memory serves, announcing each call to the peers first."""

    name = "torch"

    def __init__(self, torch_engine: TorchEngine, shm: ShmEngine):
        self._torch, self._shm = torch_engine, shm

    def all_reduce_(self, tensor, op):
        self._shm.announce_elsewhere("all_reduce", tensor.numel(), op, -1)
        self._torch.all_reduce_(tensor, op)

    def all_gather(self, tensor):
        self._shm.announce_elsewhere("all_gather", tensor.numel(), dist.ReduceOp.SUM, -1)
        return self._torch.all_gather(tensor)

    def reduce_scatter(self, tensor, op):
        self._shm.announce_elsewhere("reduce_scatter", tensor.numel(), op, -1)
        return self._torch.reduce_scatter(tensor, op)

    def broadcast_(self, tensor, group_src):
        self._shm.announce_elsewhere("broadcast", tensor.numel(), dist.ReduceOp.SUM, group_src)
        self._torch.broadcast_(tensor, group_src)

    def barrier(self):
        self._shm.announce_elsewhere("barrier", 0, dist.ReduceOp.SUM, -1)
        self._torch.barrier()


class RefusingEngine:
    """What `shm` forced gives for a tensor shared memory cannot run: every call raises `error`,
    announced to the peers first when shared memory serves the group (`shm` is not None)."""

    name = "shm"

    def __init__(self, error: NeuronxDistributedError, shm: ShmEngine | None):
        self._error, self._shm = error, shm

    def _refuse(self, collective, tensor, op=dist.ReduceOp.SUM, root=-1):
        if self._shm is None:
            raise self._error
        self._shm.announce_refusal(collective, tensor.numel(), op, root, self._error)

    def all_reduce_(self, tensor, op):
        self._refuse("all_reduce", tensor, op)

    def all_gather(self, tensor):
        self._refuse("all_gather", tensor)

    def reduce_scatter(self, tensor, op):
        self._refuse("reduce_scatter", tensor, op)

    def broadcast_(self, tensor, group_src):
        self._refuse("broadcast", tensor, root=group_src)

    def barrier(self):
        raise self._error

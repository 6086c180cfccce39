"""The shared-memory collectives as torch custom ops, so torch.compile and torch.export see one
opaque op per collective (`torch.ops.nxd.shm_*`), each with a fake implementation for tracing.
Eager calls do not come here: `comm` calls the bound C++ functions directly (see `shm.ShmEngine`).

The ops are declared with `torch.library.define`/`impl`/`register_fake` rather than the
`torch.library.custom_op` decorator: the decorator's Python wrapper costs about 20 us a call,
ten times a whole 4 KB all-reduce, while a plain CPU kernel costs about 2 us. Tensors reach
the C++ engine as DLPack capsules (`to_dlpack`, no copy), which also costs less than
letting nanobind call `Tensor.__dlpack__`.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.dlpack import to_dlpack

from ..errors import CollectiveError
from .native import _C
from .shm_groups import GroupRegistry

groups = GroupRegistry()


def _raising_collective_error(kernel):
    """Re-raise the engine's failures as CollectiveError, keeping their message."""

    @functools.wraps(kernel)
    def run(*args):
        try:
            return kernel(*args)
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure

    return run


torch.library.define("nxd::shm_all_reduce_", "(Tensor(a!) tensor, str op, str group_name) -> ()")
torch.library.define("nxd::shm_all_gather", "(Tensor tensor, int group_size, str group_name) -> Tensor")
torch.library.define("nxd::shm_reduce_scatter", "(Tensor tensor, str op, str group_name) -> Tensor")
torch.library.define("nxd::shm_broadcast_", "(Tensor(a!) tensor, int group_src, str group_name) -> ()")


@torch.library.impl("nxd::shm_all_reduce_", "cpu")
@_raising_collective_error
def _all_reduce_(tensor, op, group_name):
    groups.handle_by_name(group_name).all_reduce(to_dlpack(tensor), op)


@torch.library.impl("nxd::shm_all_gather", "cpu")
@_raising_collective_error
def _all_gather(tensor, group_size, group_name):
    out = tensor.new_empty((group_size, *tensor.shape))
    groups.handle_by_name(group_name).all_gather(to_dlpack(tensor), to_dlpack(out))
    return out


@torch.library.impl("nxd::shm_reduce_scatter", "cpu")
@_raising_collective_error
def _reduce_scatter(tensor, op, group_name):
    out = tensor.new_empty(tensor.shape[1:])
    groups.handle_by_name(group_name).reduce_scatter(to_dlpack(tensor), to_dlpack(out), op)
    return out


@torch.library.impl("nxd::shm_broadcast_", "cpu")
@_raising_collective_error
def _broadcast_(tensor, group_src, group_name):
    groups.handle_by_name(group_name).broadcast(to_dlpack(tensor), group_src)


@torch.library.register_fake("nxd::shm_all_reduce_")
def _all_reduce_fake(tensor, op, group_name):
    return None


@torch.library.register_fake("nxd::shm_all_gather")
def _all_gather_fake(tensor, group_size, group_name):
    return tensor.new_empty((group_size, *tensor.shape))


@torch.library.register_fake("nxd::shm_reduce_scatter")
def _reduce_scatter_fake(tensor, op, group_name):
    return tensor.new_empty(tensor.shape[1:])


@torch.library.register_fake("nxd::shm_broadcast_")
def _broadcast_fake(tensor, group_src, group_name):
    return None


@_raising_collective_error
def barrier(group_name: str) -> None:
    """Block until every rank of the group arrives (no tensor, so not a traced op)."""
    groups.handle_by_name(group_name).barrier()


@_raising_collective_error
def announce_elsewhere(group_name: str, collective: str, reason: str, count: int, op: str, root: int) -> None:
    """Publish that this rank does not run `collective` on shared memory (see ShmEngine.announce_elsewhere)."""
    groups.handle_by_name(group_name).announce_elsewhere(collective, reason, count, op, root)

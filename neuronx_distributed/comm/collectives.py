"""Public collectives: validate, pick the engine, reshape along any dim, record.

Every function takes a torch process group (default: the tensor-parallel group)
and returns its result; `all_reduce` and `broadcast` work in place like
torch.distributed and also return the tensor.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import CollectiveError, InputShapeError
from .engine import Engine, TorchEngine

BACKEND_ENV = "NXD_COMM_BACKEND"
_BACKEND_CHOICES = ("auto", "shm", "torch")
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

_torch_engine = TorchEngine()
_shm_engine: Engine | None = None


def register_shm_engine(engine: Engine) -> None:
    """Install the shared-memory engine that `auto` and `shm` choose."""
    global _shm_engine
    _shm_engine = engine


def shm_engine_available() -> bool:
    """Whether the shared-memory engine is installed (it still runs only where it `supports` the call)."""
    return _shm_engine is not None


def backend_choice() -> str:
    """The engine choice from NXD_COMM_BACKEND: auto (default), shm or torch."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _BACKEND_CHOICES:
        raise CollectiveError(f"{BACKEND_ENV}={choice!r} is not one of {', '.join(_BACKEND_CHOICES)}.")
    return choice


def engine_for(tensor: torch.Tensor, group: dist.ProcessGroup) -> Engine:
    """The engine that runs a collective on `tensor` over `group`."""
    choice = backend_choice()
    if choice == "torch":
        return _torch_engine
    shm_usable = _shm_engine is not None and _shm_engine.supports(tensor, group)
    if choice == "shm" and not shm_usable:
        raise CollectiveError(
            f"{BACKEND_ENV}=shm but the shared-memory engine cannot run this collective "
            f"(a {tensor.device.type} tensor of {tensor.dtype}; it needs CPU tensors and every rank of "
            f"the group on this host); unset {BACKEND_ENV} or set it to auto or torch."
        )
    return _shm_engine if shm_usable else _torch_engine


@dataclass
class CollectiveLog:
    """Collectives issued while recording: (name, engine name, element count) in order."""

    calls: list[tuple[str, str, int]] = field(default_factory=list)

    def counts(self) -> Counter:
        """How many times each collective ran."""
        return Counter(name for name, _, _ in self.calls)


_active_logs: list[CollectiveLog] = []


@contextlib.contextmanager
def record_collectives():
    """Record every collective issued through `comm` inside the block."""
    log = CollectiveLog()
    _active_logs.append(log)
    try:
        yield log
    finally:
        _active_logs.remove(log)


def _record(name: str, engine: Engine, tensor: torch.Tensor) -> None:
    for log in _active_logs:
        log.calls.append((name, engine.name, tensor.numel()))


def _resolve_group(group):
    if group is None:
        from ..parallel_layers import parallel_state

        return parallel_state.get_tensor_model_parallel_group()
    return group


def _resolve_op(op) -> dist.ReduceOp:
    if isinstance(op, str):
        if op.lower() not in _REDUCE_OPS:
            raise CollectiveError(f"reduce op {op!r} is not supported; use 'sum' or 'max'.")
        return _REDUCE_OPS[op.lower()]
    if op not in _REDUCE_OPS.values():
        raise CollectiveError(f"reduce op {op!r} is not supported; use ReduceOp.SUM or ReduceOp.MAX.")
    return op


def all_reduce(tensor: torch.Tensor, op="sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the group in place (sum or max) and return it."""
    group = _resolve_group(group)
    op = _resolve_op(op)
    if dist.get_world_size(group) == 1:
        return tensor
    engine = engine_for(tensor, group)
    _record("all_reduce", engine, tensor)
    if tensor.is_contiguous():
        engine.all_reduce_(tensor, op, group)
    else:
        contiguous = tensor.contiguous()
        engine.all_reduce_(contiguous, op, group)
        tensor.copy_(contiguous)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1, group=None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`, in group-rank order."""
    group = _resolve_group(group)
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    dim = _check_dim(tensor, dim)
    engine = engine_for(tensor, group)
    _record("all_gather", engine, tensor)
    stacked = engine.all_gather(tensor.contiguous(), group)  # (world, *shape)
    shape = list(tensor.shape)
    shape[dim] *= world
    return stacked.movedim(0, dim).reshape(shape)


def reduce_scatter(tensor: torch.Tensor, dim: int = -1, op="sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the group and return this rank's chunk of it along `dim`."""
    group = _resolve_group(group)
    op = _resolve_op(op)
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    dim = _check_dim(tensor, dim)
    if tensor.shape[dim] % world != 0:
        raise InputShapeError(
            f"reduce_scatter along dim {dim} needs a size divisible by the group size {world}, "
            f"got shape {tuple(tensor.shape)}; pad that dimension to a multiple of {world}."
        )
    engine = engine_for(tensor, group)
    _record("reduce_scatter", engine, tensor)
    chunk = tensor.shape[dim] // world
    split = tensor.unflatten(dim, (world, chunk)).movedim(dim, 0).contiguous()
    return engine.reduce_scatter(split, op, group)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Overwrite `tensor` in place with global rank `src`'s copy and return it."""
    group = _resolve_group(group)
    if dist.get_world_size(group) == 1:
        return tensor
    engine = engine_for(tensor, group)
    _record("broadcast", engine, tensor)
    group_src = dist.get_group_rank(group, src)
    if tensor.is_contiguous():
        engine.broadcast_(tensor, group_src, group)
    else:
        contiguous = tensor.contiguous()
        engine.broadcast_(contiguous, group_src, group)
        tensor.copy_(contiguous)
    return tensor


def barrier(group=None) -> None:
    """Block until every rank of the group has called `barrier`."""
    group = _resolve_group(group)
    if dist.get_world_size(group) == 1:
        return
    probe = torch.empty(0)
    engine = engine_for(probe, group)
    _record("barrier", engine, probe)
    engine.barrier(group)


def _check_dim(tensor: torch.Tensor, dim: int) -> int:
    if tensor.dim() == 0:
        raise InputShapeError("cannot gather or scatter a 0-dimensional tensor; reshape it to at least 1-d.")
    if not -tensor.dim() <= dim < tensor.dim():
        raise InputShapeError(f"dim {dim} is out of range for a tensor of shape {tuple(tensor.shape)}.")
    return dim % tensor.dim()

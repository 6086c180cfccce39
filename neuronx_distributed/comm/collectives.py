"""Public collectives: validate, pick the engine, reshape along any dim, record.

Every function takes a torch process group (default: the tensor-parallel group)
and returns its result; `all_reduce` and `broadcast` work in place like
torch.distributed and also return the tensor.

No rank is left waiting for a peer that went elsewhere: on a group that the
shared-memory engine serves, a rank whose call runs on torch.distributed (a dtype
or device that shared memory does not run) or raises for its input says so in one
shared-memory step first, and a peer that chose shared memory for that call fails
at once with CollectiveError, as does this rank. (Groups that shared memory does
not serve rely on torch.distributed's own timeout.)
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import CollectiveError, InputShapeError, NeuronxDistributedError
from .engine import Engine, SharedMemoryEngine, TorchEngine

BACKEND_ENV = "NXD_COMM_BACKEND"
_BACKEND_CHOICES = ("auto", "shm", "torch")
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

_torch_engine = TorchEngine()
_shm_engine: SharedMemoryEngine | None = None


def register_shm_engine(engine: SharedMemoryEngine) -> None:
    """Install the shared-memory engine that `auto` and `shm` choose."""
    global _shm_engine
    _shm_engine = engine


def shm_engine_available() -> bool:
    """Whether the shared-memory engine is installed (it still runs only where it `supports` the call)."""
    return _shm_engine is not None


def backend_choice() -> str:
    """The engine choice from NXD_COMM_BACKEND: auto (default), shm or torch."""
    text = os.environ.get(BACKEND_ENV, "auto")
    if text in _BACKEND_CHOICES:  # read on every collective: skip the normalizing when it is not needed
        return text
    choice = text.strip().lower() or "auto"
    if choice not in _BACKEND_CHOICES:
        raise CollectiveError(f"{BACKEND_ENV}={choice!r} is not one of {', '.join(_BACKEND_CHOICES)}.")
    return choice


def engine_for(tensor: torch.Tensor, group: dist.ProcessGroup) -> Engine:
    """The engine that runs a collective on `tensor` over `group` (sets the group's engine up on first use)."""
    choice = backend_choice()
    if choice == "torch":
        return _torch_engine
    shm_usable = _shm_engine is not None and _shm_engine.supports(tensor, group)
    if choice == "shm" and not shm_usable:
        raise _shm_refusal(tensor)
    return _shm_engine if shm_usable else _torch_engine


def _shm_refusal(tensor: torch.Tensor) -> CollectiveError:
    return CollectiveError(
        f"{BACKEND_ENV}=shm but the shared-memory engine cannot run this collective "
        f"(a {tensor.device.type} tensor of {tensor.dtype}; it needs CPU tensors of float32, float64, bfloat16 "
        f"or float16 and every rank of the group on this host); unset {BACKEND_ENV} or set it to auto or torch."
    )


def _engine_for_call(
    collective: str,
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    op: dist.ReduceOp = dist.ReduceOp.SUM,
    root: int = -1,
    invalid: NeuronxDistributedError | None = None,
) -> Engine:
    """`engine_for`, plus the announcement (module docstring) when this rank leaves shared memory.

    `invalid` is this rank's error for its input, raised here once the peers know.
    """
    choice = backend_choice()
    shm = _shm_engine
    if invalid is None and choice != "torch" and shm is not None and shm.supports(tensor, group):
        return shm  # the fast path: as cheap as before the announcements existed
    if choice == "torch":
        if invalid is not None:
            raise invalid
        return _torch_engine
    # Whether shared memory serves the group depends on the group alone (and the tensor being on CPU,
    # which all ranks of a call share), never on this rank's dtype: every rank reaches the same answer.
    on_cpu = not isinstance(tensor, torch.Tensor) or tensor.device.type == "cpu"  # a non-tensor is refused below
    served = shm is not None and on_cpu and shm.serves(group)
    if invalid is None and choice == "shm":
        invalid = _shm_refusal(tensor)
    if served and not torch.compiler.is_compiling():
        count = tensor.numel() if isinstance(tensor, torch.Tensor) else 0
        reason = "invalid_input" if invalid is not None else "other_engine"
        try:
            shm.announce_elsewhere(group, collective, reason, count, op, root)
        except CollectiveError as disagreement:
            if invalid is not None:
                raise invalid from disagreement
            raise
    if invalid is not None:
        raise invalid
    return _torch_engine


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


def _resolve_group(group) -> dist.ProcessGroup:
    """The group to run on (default: the TP group), refused unless this rank is a live member of it."""
    if group is None:
        from ..parallel_layers import parallel_state

        return parallel_state.get_tensor_model_parallel_group()
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise CollectiveError(
            f"global rank {dist.get_rank()} is not a member of this process group (torch.distributed.new_group "
            "returns GroupMember.NON_GROUP_MEMBER on the ranks it leaves out); call the collective only on the "
            "ranks that the group was created with."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise CollectiveError(
            f"group must be a torch.distributed.ProcessGroup (or None for the tensor-parallel group), got "
            f"{type(group).__name__}; create it with torch.distributed.new_group(ranks)."
        )
    # The registry that torch.distributed.get_rank consults, read directly: this runs on every call.
    if group not in dist.distributed_c10d._world.pg_group_ranks:
        raise CollectiveError(
            "this process group was destroyed (torch.distributed.destroy_process_group or "
            "parallel_state.destroy_model_parallel); use a live group, e.g. the current "
            "parallel_state.get_tensor_model_parallel_group()."
        )
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
    if group.size() == 1:
        _resolve_op(op)
        return tensor
    # A typed error for this rank's input is raised by _engine_for_call, once the peers know of it.
    resolved, invalid = dist.ReduceOp.SUM, None
    try:
        resolved = _resolve_op(op)
        _check_writable(tensor)
    except NeuronxDistributedError as error:
        invalid = error
    engine = _engine_for_call("all_reduce", tensor, group, op=resolved, invalid=invalid)
    _record("all_reduce", engine, tensor)
    if tensor.is_contiguous():
        engine.all_reduce_(tensor, resolved, group)
    else:
        contiguous = tensor.contiguous()
        engine.all_reduce_(contiguous, resolved, group)
        tensor.copy_(contiguous)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1, group=None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`, in group-rank order."""
    group = _resolve_group(group)
    world = group.size()
    if world == 1:
        return tensor
    invalid = None
    try:
        dim = _check_dim(tensor, dim)
    except NeuronxDistributedError as error:
        invalid = error
    engine = _engine_for_call("all_gather", tensor, group, invalid=invalid)
    _record("all_gather", engine, tensor)
    if _on_gloo(engine, group):
        # gloo's all-gather is slower than one broadcast from each rank (4 processes on one
        # host, 2026-12: 25 MB in 243 ms vs 153 ms, 100 MB in 842 vs 584 ms; 2 processes,
        # 100 MB: 682 vs 292 ms), so on gloo every rank broadcasts its row in turn.
        stacked = tensor.new_empty(world, *tensor.shape)
        stacked[group.rank()].copy_(tensor)
        for src in range(world):
            engine.broadcast_(stacked[src], src, group)
    else:
        stacked = engine.all_gather(tensor.contiguous(), group)  # (world, *shape)
    shape = list(tensor.shape)
    shape[dim] *= world
    return stacked.movedim(0, dim).reshape(shape)


def reduce_scatter(tensor: torch.Tensor, dim: int = -1, op="sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the group and return this rank's chunk of it along `dim`."""
    group = _resolve_group(group)
    world = group.size()
    if world == 1:
        _resolve_op(op)
        return tensor
    resolved, invalid = dist.ReduceOp.SUM, None
    try:
        resolved = _resolve_op(op)
        dim = _check_scatter_dim(tensor, dim, world)
    except NeuronxDistributedError as error:
        invalid = error
    engine = _engine_for_call("reduce_scatter", tensor, group, op=resolved, invalid=invalid)
    _record("reduce_scatter", engine, tensor)
    chunk = tensor.shape[dim] // world
    split = tensor.unflatten(dim, (world, chunk)).movedim(dim, 0).contiguous()
    if _on_gloo(engine, group):
        # gloo's reduce-scatter is slower than its all-reduce (4 processes on one host,
        # 2026-12: 100 MB in 1098 ms vs 985 ms, 8 MB in 92 vs 70 ms; 2 processes, 100 MB:
        # 726 vs 684 ms), so on gloo: all-reduce a copy and keep this rank's row.
        if split.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            split = split.clone()  # never reduce into the caller's tensor
        engine.all_reduce_(split, resolved, group)
        return split[group.rank()].clone()
    return engine.reduce_scatter(split, resolved, group)


def _on_gloo(engine: Engine, group: dist.ProcessGroup) -> bool:
    """Whether a call runs on torch.distributed over a gloo group (see all_gather and reduce_scatter)."""
    return engine is _torch_engine and dist.get_backend(group) == "gloo"


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Overwrite `tensor` in place with global rank `src`'s copy and return it."""
    group = _resolve_group(group)
    if group.size() == 1:
        return tensor
    group_src, invalid = -1, None
    try:
        group_src = _group_rank_of(group, src)
        _check_writable(tensor)
    except NeuronxDistributedError as error:
        invalid = error
    engine = _engine_for_call("broadcast", tensor, group, root=group_src, invalid=invalid)
    _record("broadcast", engine, tensor)
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
    if group.size() == 1:
        return
    probe = torch.empty(0)
    engine = _engine_for_call("barrier", probe, group)
    _record("barrier", engine, probe)
    engine.barrier(group)


def _check_tensor(tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise CollectiveError(f"collectives take a torch.Tensor, got {type(tensor).__name__}; convert it first.")


def _check_writable(tensor) -> None:
    """An in-place collective needs a tensor whose elements each have their own memory."""
    _check_tensor(tensor)
    if not tensor.is_contiguous() and any(
        stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape)
    ):
        raise InputShapeError(
            f"an in-place collective cannot write a tensor whose elements share memory (shape "
            f"{tuple(tensor.shape)}, strides {tensor.stride()}, e.g. from expand()); pass tensor.clone()."
        )


def _check_dim(tensor, dim: int) -> int:
    _check_tensor(tensor)
    if tensor.dim() == 0:
        raise InputShapeError("cannot gather or scatter a 0-dimensional tensor; reshape it to at least 1-d.")
    if not isinstance(dim, int) or not -tensor.dim() <= dim < tensor.dim():
        raise InputShapeError(f"dim {dim!r} is out of range for a tensor of shape {tuple(tensor.shape)}.")
    return dim % tensor.dim()


def _check_scatter_dim(tensor, dim: int, world: int) -> int:
    dim = _check_dim(tensor, dim)
    if tensor.shape[dim] % world != 0:
        raise InputShapeError(
            f"reduce_scatter along dim {dim} needs a size divisible by the group size {world}, "
            f"got shape {tuple(tensor.shape)}; pad that dimension to a multiple of {world}."
        )
    return dim


def _group_rank_of(group: dist.ProcessGroup, src) -> int:
    ranks = dist.get_process_group_ranks(group)
    if src not in ranks:
        raise CollectiveError(
            f"broadcast source {src!r} is not a rank of this group (global ranks {ranks}); pass the global rank "
            "of one of its members."
        )
    return dist.get_group_rank(group, src)

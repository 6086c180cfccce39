"""Public collectives: validate, look the group's engine up, reshape along any dim, record.

Every function takes a torch process group (default: the group that `set_default_group`
registered, the tensor-parallel group once parallel_state is imported) and returns its
result; `all_reduce` and `broadcast` work in place like torch.distributed and also return
the tensor.

An eager call goes straight to the engine that its group (`comm.groups`) chose for the
tensor's device and dtype at the first such call. A call being traced (torch.compile,
torch.export, or any torch dispatch mode, e.g. CommDebugMode) goes through the engine's
traced form instead: the `torch.ops.nxd.shm_*` custom ops for shared memory.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import CollectiveError, InputShapeError, NeuronxDistributedError
from . import settings
from .engine import Engine
from .groups import GroupEngines

_SUM, _MAX = dist.ReduceOp.SUM, dist.ReduceOp.MAX
_REDUCE_OPS = {"sum": _SUM, "max": _MAX}
_EAGER_TYPES = (torch.Tensor, torch.nn.Parameter)
# Looked up once here, not per call. torch.compile folds calls of this very function to True.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack

_engines: dict[dist.ProcessGroup, GroupEngines] = {}
_default_group: Callable[[], dist.ProcessGroup] | None = None
# The registry that torch.distributed.get_rank consults, read directly: `_engines_of` runs on every call.
_live_groups = dist.distributed_c10d._world.pg_group_ranks


def set_default_group(resolve: Callable[[], dist.ProcessGroup]) -> None:
    """Use `resolve()` as the group of collectives called without one (parallel_state registers its TP group)."""
    global _default_group
    _default_group = resolve


def set_backend(backend: str = "auto", timeout_s: float | None = None) -> None:
    """Choose the engine of every group from its next collective on: auto (shared memory where it can
    run, else torch.distributed), shm (shared memory or a CollectiveError) or torch; and the seconds
    the shared-memory engine waits for a stalled peer (None: torch.distributed's default timeout).

    NXD_COMM_BACKEND and NXD_COMM_TIMEOUT, when set, override these. Collective: call it alike on
    every rank. The groups set up so far are set up again now, in the order they were first used
    (their ranks raise CommBackendError if they were set up differently); others at their first call.
    """
    backend = settings.check_backend(backend, "backend")
    if timeout_s is not None:
        timeout_s = settings.check_timeout(timeout_s, "timeout_s")
    settings.store(backend, timeout_s)
    groups = [group for group in _engines if group in _live_groups]
    _engines.clear()
    for group in groups:
        _engines[group] = GroupEngines.set_up(group)


def set_up(group=None) -> GroupEngines:
    """Set the group's engines up now (collective over the group) unless done already, and return them."""
    return _engines_of(group)


def engine_for(group=None, tensor: torch.Tensor | None = None) -> Engine:
    """The engine that runs eager collectives on `tensor` (default: a CPU float32 tensor) over `group`."""
    return _engines_of(group).engine_for(torch.empty(0) if tensor is None else tensor)


def _engines_of(group) -> GroupEngines:
    """The group's engines (set up at its first call: collective), refused unless this rank is a live member."""
    if group is None:
        if _default_group is None:
            raise CollectiveError(
                "no process group given and no default registered; pass group=, or call "
                "parallel_state.initialize_model_parallel to use the tensor-parallel group."
            )
        group = _default_group()
    try:
        engines = _engines.get(group)
    except TypeError:  # unhashable: not a group, refused below
        engines = None
    if engines is not None and group in _live_groups:
        return engines
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
    if group not in _live_groups:
        _engines.pop(group, None)
        raise CollectiveError(
            "this process group was destroyed (torch.distributed.destroy_process_group or "
            "parallel_state.destroy_model_parallel); use a live group, e.g. the current "
            "parallel_state.get_tensor_model_parallel_group()."
        )
    if torch.compiler.is_compiling():
        raise CollectiveError(
            "a collective is traced on a process group whose engines are not set up; run comm.set_up(group) "
            "(or one eager collective on it) on every rank before torch.compile or torch.export."
        )
    for stale in [known for known in _engines if known not in _live_groups]:
        del _engines[stale]
    engines = _engines[group] = GroupEngines.set_up(group)
    return engines


def _engine(engines: GroupEngines, tensor: torch.Tensor) -> Engine:
    """The group's engine for this call: its traced form when the call is being traced or intercepted
    (torch.compile, torch.export, fake or functional tensors, a torch dispatch mode), so that the tracer
    sees the collective; else the eager engine chosen for the tensor's device and dtype."""
    if _is_compiling() or _dispatch_modes() > 0 or type(tensor) not in _EAGER_TYPES:
        return engines.traced_engine_for(tensor)
    return engines.engine_for(tensor)


def _refuse(engines: GroupEngines, collective: str, tensor, error: NeuronxDistributedError, op=None, root=-1):
    """Raise `error` for this rank's input, once the peers on shared memory (every peer of a
    hierarchical group) know of it."""
    shm = engines.shm if engines.shm is not None else engines.hierarchical
    on_cpu = not isinstance(tensor, torch.Tensor) or tensor.device.type == "cpu"  # a non-tensor is refused alike
    if shm is None or not on_cpu or engines.backend == "torch" or torch.compiler.is_compiling():
        raise error
    count = tensor.numel() if isinstance(tensor, torch.Tensor) else 0
    shm.announce_refusal(collective, count, op if op is not None else dist.ReduceOp.SUM, root, error)


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


def _resolve_op(op) -> dist.ReduceOp:
    """`op` as the very object dist.ReduceOp.SUM or dist.ReduceOp.MAX: engines tell ops apart by identity,
    since hashing or comparing a ReduceOp by value costs up to 1 us (bound C++ calls)."""
    if type(op) is str:  # the common case: "sum" (the default) or "max"
        resolved = _REDUCE_OPS.get(op)
        if resolved is not None:
            return resolved
    if op is _SUM or op is _MAX:
        return op
    if isinstance(op, str):
        resolved = _REDUCE_OPS.get(op.lower())
        if resolved is None:
            raise CollectiveError(f"reduce op {op!r} is not supported; use 'sum' or 'max'.")
        return resolved
    for known in (_SUM, _MAX):
        if op == known:  # e.g. dist.ReduceOp(dist.ReduceOp.SUM), a distinct object
            return known
    raise CollectiveError(f"reduce op {op!r} is not supported; use ReduceOp.SUM or ReduceOp.MAX.")


def all_reduce(tensor: torch.Tensor, op="sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the group in place (sum or max) and return it."""
    engines = _engines_of(group)
    if engines.size == 1:
        _resolve_op(op)
        return tensor
    try:
        resolved = _resolve_op(op)
        contiguous = _check_writable(tensor)
    except NeuronxDistributedError as error:
        _refuse(engines, "all_reduce", tensor, error)
    engine = _engine(engines, tensor)
    if _active_logs:
        _record("all_reduce", engine, tensor)
    if contiguous:
        engine.all_reduce_(tensor, resolved)
    else:
        contiguous = tensor.contiguous()
        engine.all_reduce_(contiguous, resolved)
        tensor.copy_(contiguous)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1, group=None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`, in group-rank order."""
    engines = _engines_of(group)
    world = engines.size
    if world == 1:
        return tensor
    try:
        dim = _check_dim(tensor, dim)
    except NeuronxDistributedError as error:
        _refuse(engines, "all_gather", tensor, error)
    engine = _engine(engines, tensor)
    if _active_logs:
        _record("all_gather", engine, tensor)
    stacked = engine.all_gather(tensor.contiguous())  # (world, *shape)
    shape = list(tensor.shape)
    shape[dim] *= world
    return stacked.movedim(0, dim).reshape(shape)


def reduce_scatter(tensor: torch.Tensor, dim: int = -1, op="sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the group and return this rank's chunk of it along `dim`."""
    engines = _engines_of(group)
    world = engines.size
    if world == 1:
        _resolve_op(op)
        return tensor
    try:
        resolved = _resolve_op(op)
        dim = _check_scatter_dim(tensor, dim, world)
    except NeuronxDistributedError as error:
        _refuse(engines, "reduce_scatter", tensor, error)
    engine = _engine(engines, tensor)
    if _active_logs:
        _record("reduce_scatter", engine, tensor)
    chunk = tensor.shape[dim] // world
    split = tensor.unflatten(dim, (world, chunk)).movedim(dim, 0).contiguous()
    return engine.reduce_scatter(split, resolved)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Overwrite `tensor` in place with global rank `src`'s copy and return it."""
    engines = _engines_of(group)
    if engines.size == 1:
        return tensor
    try:
        group_src = _group_rank_of(engines, src)
        contiguous = _check_writable(tensor)
    except NeuronxDistributedError as error:
        _refuse(engines, "broadcast", tensor, error)
    engine = _engine(engines, tensor)
    if _active_logs:
        _record("broadcast", engine, tensor)
    if contiguous:
        engine.broadcast_(tensor, group_src)
    else:
        contiguous = tensor.contiguous()
        engine.broadcast_(contiguous, group_src)
        tensor.copy_(contiguous)
    return tensor


def barrier(group=None) -> None:
    """Block until every rank of the group has called `barrier`."""
    engines = _engines_of(group)
    if engines.size == 1:
        return
    probe = torch.empty(0)
    engine = engines.engine_for(probe)
    if _active_logs:
        _record("barrier", engine, probe)
    engine.barrier()


def _check_tensor(tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise CollectiveError(f"collectives take a torch.Tensor, got {type(tensor).__name__}; convert it first.")


def _check_writable(tensor) -> bool:
    """Whether `tensor` is contiguous; raises unless each of its elements has its own memory, which an
    in-place collective needs."""
    if type(tensor) is not torch.Tensor:
        _check_tensor(tensor)
    if tensor.is_contiguous():
        return True
    if any(stride == 0 and size > 1 for stride, size in zip(tensor.stride(), tensor.shape)):
        raise InputShapeError(
            f"an in-place collective cannot write a tensor whose elements share memory (shape "
            f"{tuple(tensor.shape)}, strides {tensor.stride()}, e.g. from expand()); pass tensor.clone()."
        )
    return False


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


def _group_rank_of(engines: GroupEngines, src) -> int:
    try:
        return engines.group_rank_of[src]
    except (KeyError, TypeError):  # TypeError: unhashable
        raise CollectiveError(
            f"broadcast source {src!r} is not a rank of this group (global ranks {list(engines.group_rank_of)}); "
            "pass the global rank of one of its members."
        ) from None

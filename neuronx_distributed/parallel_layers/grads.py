"""Gradient clipping across the TP group, gradient averaging across the DP group, and the
sequence-parallel gradient sum across the TP group."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .. import comm
from ..errors import ParallelSizeError
from . import parallel_state
from .resharding import partition_parts, replica_pieces
from .utils import is_tensor_parallel

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def _as_list(parameters) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def get_grad_norm(
    parameters,
    norm_type: float = 2,
    zero1_optimizer: bool = False,
    zero1_optimizer_groups=None,
    force_spmd: bool = True,
    *,
    group=None,
) -> torch.Tensor:
    """The total gradient norm over the whole (unsharded) model, as upstream's `grads.get_grad_norm`.

    Sharded parameters contribute on every TP rank; replicated ones only on TP rank 0,
    so each element is counted once (a replicated KV head once, not once per copy) and the result equals
    `torch.linalg.vector_norm` of every gradient of the unsharded model. `norm_type`
    may be `inf`. With `zero1_optimizer=True` the parameters are this rank's ZeRO-1
    shards and the norm is also summed over the data-parallel group;
    `zero1_optimizer_groups` (rank lists) must then be
    `parallel_state.get_data_parallel_group(as_list=True)` or None (upstream sums over
    the world, the same total here since pipeline parallelism is 1).
    `force_spmd`: upstream's choice between counting replicated gradients on every TP
    rank divided by the TP size (True) or once (False); here they are always counted
    once, exactly, so it has no effect. `group`: the TP group (default: parallel_state's).
    Returns a 0-dim float32 tensor on the gradients' device.
    """
    if zero1_optimizer_groups is not None:
        if not zero1_optimizer:
            raise ParallelSizeError(
                "get_grad_norm got zero1_optimizer_groups with zero1_optimizer=False; pass zero1_optimizer=True "
                "when the parameters are ZeRO-1 shards, or drop zero1_optimizer_groups."
            )
        if zero1_optimizer_groups != parallel_state.get_data_parallel_group(as_list=True):
            raise ParallelSizeError(
                "get_grad_norm: zero1_optimizer_groups must be parallel_state.get_data_parallel_group(as_list=True) "
                f"(the groups NeuronZero1Optimizer shards over), got {zero1_optimizer_groups!r}."
            )
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    norm_type = float(norm_type)
    params = [p for p in _as_list(parameters) if p.grad is not None]
    first_in_group = dist.get_rank(group) == 0
    world = dist.get_world_size(group)
    # Rows of replicated KV heads (resharding.Part) are held `copies` times across the group: each counts 1/copies.
    counted = [
        (piece, copies)
        for p in params if is_tensor_parallel(p) or first_in_group
        for piece, copies in replica_pieces(p.grad.detach(), partition_parts(p), world, getattr(p, "partition_dim", 0))
    ]
    device = params[0].grad.device if params else torch.device("cpu")
    if counted:
        norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g, _ in counted]
        if norm_type == float("inf"):
            local = torch.stack(norms).max()
        else:
            local = torch.stack([norm.pow(norm_type) / copies for norm, (_, copies) in zip(norms, counted)]).sum()
    else:
        local = torch.zeros((), dtype=torch.float32, device=device)
    local = local.reshape(1)
    op = "max" if norm_type == float("inf") else "sum"
    total = comm.all_reduce(local, op=op, group=group)
    if zero1_optimizer:
        total = comm.all_reduce(total, op=op, group=parallel_state.get_data_parallel_group())
    return total[0] if norm_type == float("inf") else total[0].pow(1.0 / norm_type)


def clip_grad_norm(
    parameters,
    max_norm: float,
    norm_type: float = 2,
    zero1_optimizer: bool = False,
    zero1_optimizer_groups=None,
    force_spmd: bool = True,
    *,
    group=None,
) -> torch.Tensor:
    """Clip gradients by their total norm over the whole (unsharded) model and return that norm.

    The norm is `get_grad_norm`'s (same arguments, upstream's signature); equals
    `torch.nn.utils.clip_grad_norm_` on the unsharded model.
    """
    params = [p for p in _as_list(parameters) if p.grad is not None]
    total_norm = get_grad_norm(
        params, norm_type, zero1_optimizer, zero1_optimizer_groups, force_spmd, group=group
    )
    # Clamped rather than compared, so that no device-to-host sync is needed (as torch does).
    clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(clip_coef.to(p.grad.dtype))
    return total_norm


def _resolve_data_parallel_group(group, groups):
    if group is not None and groups is not None:
        raise ValueError("pass either group (a process group) or groups (rank lists), not both.")
    if groups is None:
        return parallel_state.get_data_parallel_group() if group is None else group
    if groups != parallel_state.get_data_parallel_group(as_list=True):
        raise ParallelSizeError(
            "groups must be parallel_state.get_data_parallel_group(as_list=True); "
            "for another grouping pass its process group as group=."
        )
    return parallel_state.get_data_parallel_group()


def _grads_agreed_across(params: list[torch.Tensor], group) -> list[torch.Tensor]:
    """The gradients of `params` that some rank of `group` holds, the same list on every rank.

    One small all-reduce (max) of a presence mask lets the ranks agree which parameters
    have a gradient anywhere; a rank without one gets zeros (as DDP treats a parameter
    unused on one replica), so that bucket i holds the same parameters on every rank.
    Parameters without a gradient on every rank are left with None. Every rank must pass
    the same parameters in the same order.
    """
    if not params:
        return []
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    comm.all_reduce(present, op="max", group=group)
    grads = []
    for param, anywhere in zip(params, present.tolist()):
        if anywhere and param.grad is None:
            param.grad = torch.zeros_like(param)
        if anywhere:
            grads.append(param.grad)
    return grads


def _all_reduce_in_buckets(grads: list[torch.Tensor], group, bucket_bytes: int, divide_by: int) -> None:
    by_dtype_and_device = buckets(grads, bucket_bytes, lambda g: (g.dtype, g.device), lambda g: g.numel() * g.element_size())
    for bucket in by_dtype_and_device:
        flat = _flatten_dense_tensors(bucket)
        comm.all_reduce(flat, op="sum", group=group)
        if divide_by != 1:
            flat.div_(divide_by)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)


def all_reduce_gradients(parameters: Iterable[torch.Tensor], group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    """Average gradients over the DP group, in buckets of at most `bucket_bytes` per dtype.

    A parameter that has a gradient on some replicas only is averaged with zeros from the
    others (as DDP does for unused parameters): the ranks first agree which parameters
    have gradients, so a missing gradient never pairs two different parameters. Every
    rank must pass the same parameters in the same order.
    """
    group = parallel_state.get_data_parallel_group() if group is None else group
    world = dist.get_world_size(group)
    if world == 1:
        return
    grads = _grads_agreed_across(_as_list(parameters), group)
    _all_reduce_in_buckets(grads, group, bucket_bytes, divide_by=world)


def allreduce_sequence_parallel_gradients(optimizer: torch.optim.Optimizer, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    """Sum over the TP group the gradients of the optimizer's parameters marked `sequence_parallel_enabled`.

    With sequence parallelism each TP rank sees its chunk of the sequence only, so the
    replicated parameters used there (LayerNorm, RowParallelLinear's bias) hold partial
    gradients; call this after backward and before clipping or the optimizer step.
    Missing gradients are handled as in `all_reduce_gradients`. The TP group defaults to
    the one `parallel_state` set up.
    """
    group = parallel_state.get_tensor_model_parallel_group() if group is None else group
    if dist.get_world_size(group) == 1:
        return
    params = [
        p
        for param_group in optimizer.param_groups
        for p in param_group["params"]
        if getattr(p, "sequence_parallel_enabled", False)
    ]
    _all_reduce_in_buckets(_grads_agreed_across(params, group), group, bucket_bytes, divide_by=1)


def buckets(items: list, bucket_bytes: int, kind, nbytes) -> list[list]:
    """`items` grouped by `kind(item)`, in order, into buckets of at most `bucket_bytes` (`nbytes(item)` each).

    A single item larger than `bucket_bytes` gets a bucket of its own. Shared by the
    DP gradient all-reduce here and ZeRO-1's reduce-scatter and all-gather.
    """
    by_kind: dict[object, list[list]] = {}
    open_bytes: dict[object, int] = {}  # bytes in each kind's last bucket
    for item in items:
        key, size = kind(item), nbytes(item)
        kind_buckets = by_kind.setdefault(key, [[]])
        if kind_buckets[-1] and open_bytes[key] + size > bucket_bytes:
            kind_buckets.append([])
            open_bytes[key] = 0
        kind_buckets[-1].append(item)
        open_bytes[key] = open_bytes.get(key, 0) + size
    return [bucket for kind_buckets in by_kind.values() for bucket in kind_buckets]


def optimizer_step(optimizer: torch.optim.Optimizer, group=None, groups=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    """Average gradients over the DP group, then step the optimizer.

    The device-agnostic replacement for the seed's
    `xm.optimizer_step(optimizer, groups=parallel_state.get_data_parallel_group(as_list=True))`:
    `groups` accepts that same rank-list form, `group` a process group; by default
    the DP group `parallel_state` set up. The seed clips before this call, so each
    replica clips by its own local norm; to match the unsharded model exactly with
    DP > 1, call `all_reduce_gradients`, then `clip_grad_norm`, then `optimizer.step()`.
    """
    group = _resolve_data_parallel_group(group, groups)
    params = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    all_reduce_gradients(params, group=group, bucket_bytes=bucket_bytes)
    return optimizer.step()

"""Tensor-parallel attributes of parameters, size arithmetic and upstream's small helpers.

The names follow upstream NxD's `parallel_layers.utils`, so that scripts importing
them from this path run here too.
"""

from __future__ import annotations

import collections.abc
import hashlib
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from ..errors import InputShapeError, ParallelSizeError
from . import parallel_state

# `partition_parts` (our addition, see resharding.Part): set where the partition dim is made of parts of
# different sizes or of replicated KV heads, e.g. by modules.qkv_linear. Every attribute holds plain ints and
# bools (the parts as (size, replication, block) tuples), so a state dict carrying them loads with weights_only.
TENSOR_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride", "num_partitions", "partition_parts")
# Attributes a parameter keeps when it is moved: its sharding, and whether sequence parallelism
# leaves its gradient partial across the TP group (see grads.allreduce_sequence_parallel_gradients).
PARAMETER_ATTRIBUTES = (*TENSOR_PARALLEL_ATTRIBUTES, "sequence_parallel_enabled")


def divide(numerator: int, denominator: int, *, what: str | None = None) -> int:
    """`numerator // denominator`, raising ParallelSizeError when it does not divide evenly.

    `what` names the numerator in the message (our addition; upstream asserts instead).
    """
    if denominator <= 0:
        raise ParallelSizeError(f"cannot divide {numerator} into {denominator} parts; pass a positive number of parts.")
    if numerator % denominator != 0:
        name = what or "the size"
        raise ParallelSizeError(
            f"{name} ({numerator}) is not divisible by {denominator}; choose a size that is a multiple "
            f"of {denominator} (or, where {denominator} is the tensor parallel size, another tensor_model_parallel_size)."
        )
    return numerator // denominator


def get_padding_length(numerator: int, denominator: int) -> int:
    """How much to add to `numerator` to make it a multiple of `denominator`."""
    return -numerator % denominator


def split_tensor_along_dim(
    tensor: torch.Tensor, dim: int, num_partitions: int, contiguous_split_chunks: bool = False
) -> list[torch.Tensor]:
    """`tensor` cut into `num_partitions` equal chunks along `dim` (views unless `contiguous_split_chunks`)."""
    if tensor.dim() == 0 or not -tensor.dim() <= dim < tensor.dim():
        raise InputShapeError(f"cannot split a tensor of shape {tuple(tensor.shape)} along dim {dim}.")
    chunk = divide(tensor.shape[dim], num_partitions, what=f"dimension {dim} of shape {tuple(tensor.shape)}")
    chunks = list(torch.split(tensor, chunk, dim=dim))
    return [c.contiguous() for c in chunks] if contiguous_split_chunks else chunks


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> list[torch.Tensor]:
    """`tensor` cut into `num_partitions` equal chunks along its last dimension."""
    return split_tensor_along_dim(tensor, -1, num_partitions, contiguous_split_chunks)


def set_tensor_model_parallel_attributes(
    tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int = 1, num_partitions: int = -1
) -> None:
    """Mark how `tensor` is sharded: along `dim` with `stride` into `num_partitions` shards when `is_parallel`.

    `num_partitions=-1` (upstream's default) means the TP size of `parallel_state`, or 1 before
    it is initialized. Unlike upstream, marking a tensor again overwrites its attributes
    instead of failing an assert (moving a model re-marks its parameters).
    """
    if num_partitions == -1:
        initialized = parallel_state.model_parallel_is_initialized()
        num_partitions = parallel_state.get_tensor_model_parallel_size() if initialized else 1
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride
    tensor.num_partitions = num_partitions


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor: torch.Tensor) -> None:
    """Give `tensor` each TP attribute it lacks, with the value of a replicated tensor (not sharded, dim -1, stride 1)."""
    defaults = {"tensor_model_parallel": False, "partition_dim": -1, "partition_stride": 1, "num_partitions": 1}
    for attribute, value in defaults.items():
        if not hasattr(tensor, attribute):
            setattr(tensor, attribute, value)


def copy_tensor_model_parallel_attributes(destination_tensor: torch.Tensor, source_tensor: torch.Tensor) -> None:
    """Give `destination_tensor` the TP attributes `source_tensor` carries (none copied where it has none)."""
    for attribute, value in tensor_model_parallel_attributes(source_tensor).items():
        setattr(destination_tensor, attribute, value)


def tensor_model_parallel_attributes(param: torch.Tensor) -> dict:
    """The sharding attributes a parameter carries (empty when it carries none)."""
    return {name: getattr(param, name) for name in TENSOR_PARALLEL_ATTRIBUTES if hasattr(param, name)}


def copy_attributes_to_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """State-dict post-hook: give each saved parameter the TP attributes of its parameter.

    `state_dict()` returns detached tensors, which carry no Python attributes; with
    this hook `parallel_layers.save` knows which entries are shards and how.
    """
    for name, param in module.named_parameters(recurse=False):
        saved = state_dict.get(prefix + name)
        if saved is not None:
            for attribute, value in tensor_model_parallel_attributes(param).items():
                setattr(saved, attribute, value)


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """True for a parameter sharded across the TP group, False for a replicated one."""
    return bool(getattr(param, "tensor_model_parallel", False))


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True where `param` counts once in the whole model: a shard on every rank, a replica on TP rank 0 only."""
    return is_tensor_parallel(param) or parallel_state.get_tensor_model_parallel_rank() == 0


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `model` under each of its names (tied ones once per name)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def move_model_to_device(model: nn.Module, device) -> nn.Module:
    """`model.to(device)` that keeps every Python attribute of every parameter and buffer; returns `model`.

    Tensor attributes (the TP and sequence-parallel marks, a `weight_loader`) survive
    even where `to()` makes new tensor objects: always for buffers, and for parameters
    under `torch.__future__.set_swap_module_params_on_conversion(True)`. Copies to an
    accelerator are issued non-blocking; copies back to the host are waited for once at
    the end, so the host tensors are complete when this returns. (Pinning the host
    memory first would cost one more host copy for data that crosses only once.)

    Also importable as `parallel_layers.move_model_to_device` (the seed's path) and from
    `parallel_layers.utils` (upstream's).
    """
    device = torch.device(device)
    attributes = {name: dict(tensor.__dict__) for name, tensor in _named_tensors(model)}
    sources = {tensor.device for _, tensor in _named_tensors(model) if tensor.device.type not in ("cpu", "meta")}
    model.to(device, non_blocking=True)
    for name, tensor in _named_tensors(model):
        tensor.__dict__.update(attributes[name])
    if device.type == "cpu":
        for source in sources:
            torch.accelerator.synchronize(source)
    return model


def is_torch_version_greater_than_2() -> bool:
    """True on torch 2.x or later (upstream's name; it means "at least 2")."""
    return int(torch.__version__.split(".")[0]) >= 2


def requires_init_pg_override() -> bool:
    """Whether `init_process_group` needs torch-xla's `pjrt://` init method, as upstream asks on torch 2.0.

    Upstream's scripts branch on it before `init_process_group("xla", ...)`. Off XLA there is no
    such override to make: True only on torch 2.0 with torch-xla installed.
    """
    if not torch.__version__.startswith("2.0"):
        return False
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def _host_key() -> int:
    """This host's name as a signed 63-bit integer (what ranks compare to find their neighbours)."""
    return int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:8], "little") >> 1


def get_local_world_size() -> int:
    """How many processes of this job run on this host.

    LOCAL_WORLD_SIZE when set (torchrun sets it); otherwise the ranks of the default
    process group whose host name matches this one (collective over the world when
    torch.distributed is initialized); 1 in a process without torch.distributed.
    """
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    keys = comm.all_gather(torch.tensor([_host_key()], dtype=torch.int64, device=device), dim=0, group=dist.group.WORLD)
    return int((keys == _host_key()).sum())


def add_barrier(name: str | None = None) -> None:
    """Wait until every rank of the job reaches this point (`name` labels it, as upstream's rendezvous tag)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
            comm.barrier(group=dist.group.WORLD)


def verify_casted_dtype(value) -> None:
    """Under autocast, check that every tensor in `value` (nested lists, tuples, dicts) has the autocast dtype.

    Raises InputShapeError where upstream asserts; a no-op when autocast is off for a tensor's device.
    """
    if isinstance(value, torch.Tensor):
        device_type = value.device.type
        if torch.is_autocast_enabled(device_type) and value.is_floating_point():
            expected = torch.get_autocast_dtype(device_type)
            if value.dtype != expected:
                raise InputShapeError(
                    f"expected a tensor cast to the autocast dtype {expected}, got {value.dtype}; "
                    "cast it (or run it outside the autocast region)."
                )
    elif isinstance(value, collections.abc.Mapping):
        for key, item in value.items():
            verify_casted_dtype(key)
            verify_casted_dtype(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            verify_casted_dtype(item)

"""Tensor-parallel attributes of parameters and size arithmetic."""

from __future__ import annotations

import torch

from ..errors import ParallelSizeError

TENSOR_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def divide(numerator: int, denominator: int, what: str) -> int:
    """`numerator // denominator`, raising when it does not divide evenly."""
    if numerator % denominator != 0:
        raise ParallelSizeError(
            f"{what} ({numerator}) is not divisible by the tensor parallel size ({denominator}); "
            f"choose a size that is a multiple of {denominator} or another tensor_model_parallel_size."
        )
    return numerator // denominator


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, dim: int, stride: int = 1) -> None:
    """Mark how `param` is sharded: along `dim` with `stride` when `is_parallel`."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = dim
    param.partition_stride = stride


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

"""Autograd-aware collectives of the tensor-parallel region, in conjugate pairs.

Each forward collective has the dual collective as its backward:

    copy_to      identity   / all-reduce        reduce_from  all-reduce / identity
    scatter_to   split      / all-gather        gather_from  all-gather / split

All work on the last dimension and take the process group explicitly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm


def _split_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    chunk = tensor.shape[-1] // world
    return tensor.narrow(-1, dist.get_rank(group) * chunk, chunk).contiguous()


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_.view_as(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return comm.all_reduce(grad_output.contiguous(), group=ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        # In place on the caller's fresh partial result, as Megatron does; no copy.
        ctx.mark_dirty(input_)
        return comm.all_reduce(input_, group=group)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return comm.all_gather(grad_output, dim=-1, group=ctx.group), None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return comm.all_gather(input_, dim=-1, group=group)

    @staticmethod
    def backward(ctx, grad_output):
        return _split_last_dim(grad_output, ctx.group), None


def copy_to_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward."""
    return _CopyToTensorParallelRegion.apply(input_, group)


def reduce_from_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward, in place on `input_`; identity backward."""
    return _ReduceFromTensorParallelRegion.apply(input_, group)


def scatter_to_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather of the gradient backward."""
    return _ScatterToTensorParallelRegion.apply(input_, group)


def gather_from_tensor_model_parallel_region(input_: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromTensorParallelRegion.apply(input_, group)

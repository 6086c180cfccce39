"""Autograd-aware collectives of the tensor- and sequence-parallel regions, in conjugate pairs.

Each forward collective has the dual collective as its backward:

    copy_to         identity    / all-reduce        reduce_from     all-reduce / identity
    scatter_to      split       / all-gather        gather_from     all-gather / split
    reduce_scatter  reduce-scatter / all-gather     gather (SP)     all-gather / reduce-scatter

The tensor-parallel mappings work on the last dimension (`*_with_dim`: any one);
the sequence-parallel ones on `sequence_dimension` (default 0: activations are
`[seq, batch, hidden]`). Every mapping takes the process group as `process_group`
(default: the TP group `parallel_state` set up) and runs through `neuronx_distributed.comm`.
Where a reduction runs, `reduce_dtype` (our addition) names the dtype it runs in
(None: the tensor's own); the result comes back in the tensor's dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..errors import InputShapeError
from . import parallel_state


def _group(process_group):
    return parallel_state.get_tensor_model_parallel_group() if process_group is None else process_group


def _check_divisible(tensor: torch.Tensor, dim: int, world: int, what: str) -> None:
    if tensor.dim() == 0 or not -tensor.dim() <= dim < tensor.dim():
        raise InputShapeError(f"dim {dim} is out of range for a tensor of shape {tuple(tensor.shape)}.")
    if tensor.shape[dim] % world != 0:
        raise InputShapeError(
            f"the {what} (dim {dim} of shape {tuple(tensor.shape)}) is {tensor.shape[dim]}, "
            f"which the tensor parallel size {world} does not divide; pad it to a multiple of {world}."
        )


def _what(dim_is_sequence: bool) -> str:
    return "sequence length" if dim_is_sequence else "size to split"


def _split(tensor: torch.Tensor, dim: int, group, what: str) -> torch.Tensor:
    """This rank's chunk of `tensor` along `dim`."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    _check_divisible(tensor, dim, world, what)
    chunk = tensor.shape[dim] // world
    return tensor.narrow(dim, dist.get_rank(group) * chunk, chunk).contiguous()


def _all_reduce(tensor: torch.Tensor, group, reduce_dtype, in_place: bool) -> torch.Tensor:
    """Sum of `tensor` over the group, reduced in `reduce_dtype` (in place when allowed and no cast is needed)."""
    if dist.get_world_size(group) == 1:
        return tensor
    if reduce_dtype is None or reduce_dtype == tensor.dtype or not tensor.is_floating_point():
        target = tensor if in_place else tensor.clone()
        return comm.all_reduce(target, group=group)
    return comm.all_reduce(tensor.to(reduce_dtype), group=group).to(tensor.dtype)


def _reduce_scatter(tensor: torch.Tensor, dim: int, group, reduce_dtype, what: str) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    _check_divisible(tensor, dim, world, what)
    if reduce_dtype is None or reduce_dtype == tensor.dtype or not tensor.is_floating_point():
        return comm.reduce_scatter(tensor, dim=dim, group=group)
    return comm.reduce_scatter(tensor.to(reduce_dtype), dim=dim, group=group).to(tensor.dtype)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group, reduce_dtype):
        ctx.group, ctx.reduce_dtype = group, reduce_dtype
        return input_.view_as(input_)

    @staticmethod
    def backward(ctx, grad_output):
        return _all_reduce(grad_output.contiguous(), ctx.group, ctx.reduce_dtype, in_place=False), None, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group, reduce_dtype, in_place):
        output = _all_reduce(input_, group, reduce_dtype, in_place)
        if output is input_:
            # In place on the caller's fresh partial result, as Megatron does; no copy.
            ctx.mark_dirty(input_)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, dim, group, what):
        ctx.dim, ctx.group = dim, group
        return _split(input_, dim, group, what)

    @staticmethod
    def backward(ctx, grad_output):
        return comm.all_gather(grad_output, dim=ctx.dim, group=ctx.group), None, None, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather forward; backward: split the gradient, or reduce-scatter it when `reduce_grad`."""

    @staticmethod
    def forward(ctx, input_, dim, group, reduce_grad, reduce_dtype):
        ctx.dim, ctx.group, ctx.reduce_grad, ctx.reduce_dtype = dim, group, reduce_grad, reduce_dtype
        return comm.all_gather(input_, dim=dim, group=group)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduce_grad:
            grad = _reduce_scatter(grad_output, ctx.dim, ctx.group, ctx.reduce_dtype, "gradient's size")
        else:
            grad = _split(grad_output, ctx.dim, ctx.group, "gradient's size")
        return grad, None, None, None, None


class _ReduceScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, dim, group, reduce_dtype, what):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(input_, dim, group, reduce_dtype, what)

    @staticmethod
    def backward(ctx, grad_output):
        return comm.all_gather(grad_output, dim=ctx.dim, group=ctx.group), None, None, None, None


def copy_to_tensor_model_parallel_region(input_: torch.Tensor, process_group=None, *, reduce_dtype=None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward."""
    return _CopyToRegion.apply(input_, _group(process_group), reduce_dtype)


def reduce_from_tensor_model_parallel_region(input_: torch.Tensor, process_group=None, *, reduce_dtype=None) -> torch.Tensor:
    """All-reduce (sum) forward, in place on `input_` when no cast is needed; identity backward."""
    return _ReduceFromRegion.apply(input_, _group(process_group), reduce_dtype, True)


def scatter_to_tensor_model_parallel_region(input_: torch.Tensor, process_group=None) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather of the gradient backward."""
    return _ScatterToRegion.apply(input_, -1, _group(process_group), _what(False))


def gather_from_tensor_model_parallel_region(input_: torch.Tensor, process_group=None) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromRegion.apply(input_, -1, _group(process_group), False, None)


def gather_from_tensor_model_parallel_region_with_dim(
    input_: torch.Tensor, gather_dim: int, process_group=None
) -> torch.Tensor:
    """All-gather along `gather_dim` forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromRegion.apply(input_, gather_dim, _group(process_group), False, None)


def scatter_to_tensor_model_parallel_region_with_dim(
    input_: torch.Tensor, partition_dim: int, process_group=None
) -> torch.Tensor:
    """Keep this rank's chunk of `partition_dim` forward; all-gather of the gradient backward."""
    return _ScatterToRegion.apply(input_, partition_dim, _group(process_group), _what(False))


def reduce_scatter_to_tensor_model_parallel_region_with_dim(
    input_: torch.Tensor, partition_dim: int, process_group=None, *, reduce_dtype=None
) -> torch.Tensor:
    """Reduce-scatter along `partition_dim` forward; all-gather of the gradient backward."""
    return _ReduceScatterToRegion.apply(input_, partition_dim, _group(process_group), reduce_dtype, _what(False))


def scatter_input_channels_to_tensor_model_parallel_region(input_: torch.Tensor, process_group=None) -> torch.Tensor:
    """Keep this rank's chunk of the channels (dim 1 of `[N, C, H, W]`); all-gather of the gradient backward."""
    return _ScatterToRegion.apply(input_, 1, _group(process_group), "channel count")


def scatter_to_sequence_parallel_region(
    input_: torch.Tensor, sequence_dimension: int = 0, process_group=None
) -> torch.Tensor:
    """Keep this rank's chunk of the sequence forward; all-gather of the gradient backward."""
    return _ScatterToRegion.apply(input_, sequence_dimension, _group(process_group), _what(True))


def gather_from_sequence_parallel_region(
    input_: torch.Tensor,
    to_model_parallel: bool = True,
    sequence_dimension: int = 0,
    process_group=None,
    *,
    reduce_dtype=None,
) -> torch.Tensor:
    """All-gather the sequence forward.

    Backward: with `to_model_parallel` (the gathered tensor feeds tensor-parallel
    compute, whose gradients are partial) reduce-scatter the gradient; otherwise keep
    this rank's chunk of it.
    """
    return _GatherFromRegion.apply(input_, sequence_dimension, _group(process_group), to_model_parallel, reduce_dtype)


def reduce_scatter_to_sequence_parallel_region(
    input_: torch.Tensor, sequence_dimension: int = 0, process_group=None, *, reduce_dtype=None
) -> torch.Tensor:
    """Reduce-scatter along the sequence forward; all-gather of the gradient backward."""
    return _ReduceScatterToRegion.apply(input_, sequence_dimension, _group(process_group), reduce_dtype, _what(True))

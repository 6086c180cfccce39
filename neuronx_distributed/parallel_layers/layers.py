"""Tensor-parallel drop-ins for torch.nn.Linear and torch.nn.Embedding.

Sharded parameters carry `tensor_model_parallel`, `partition_dim` and
`partition_stride`; replicated ones carry `tensor_model_parallel=False`; so do the
layers' `state_dict()` entries.
Each layer takes its TP process group at construction (default: the one
`parallel_state` set up).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from ..errors import InputShapeError
from . import parallel_state
from .initialization import linear_bias_init, linear_weight_init, shard_of, sharded_master
from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .utils import copy_attributes_to_state_dict, divide, set_tensor_model_parallel_attributes


class _TensorParallelModule(nn.Module):
    """A module whose `state_dict()` entries carry the TP attributes of its parameters."""

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(copy_attributes_to_state_dict)


def _group_or_default(group):
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def _check_last_dim(layer: str, input_: torch.Tensor, expected: int, hint: str) -> None:
    if input_.dim() == 0 or input_.shape[-1] != expected:
        raise InputShapeError(
            f"{layer} expects inputs whose last dimension is {expected}, got shape {tuple(input_.shape)}; {hint}"
        )


class ColumnParallelLinear(_TensorParallelModule):
    """Y = XA + b with A split along its output dimension across the TP group.

    Each rank computes Y_i = X A_i + b_i. With `gather_output=True` the shards are
    all-gathered so every rank holds Y; otherwise each keeps Y_i (the input of a
    following RowParallelLinear with `input_is_parallel=True`).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        stride: int = 1,
        init_method=linear_weight_init,
        tensor_parallel_group=None,
    ):
        super().__init__()
        self.tensor_parallel_group = _group_or_default(tensor_parallel_group)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, world, "ColumnParallelLinear output_size")
        device = device or None
        self.weight = nn.Parameter(
            sharded_master((output_size, input_size), init_method, 0, stride, rank, world, dtype, device)
        )
        set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
        if bias:
            self.bias = nn.Parameter(
                sharded_master(
                    (output_size,), partial(linear_bias_init, fan_in=input_size), 0, stride, rank, world, dtype, device
                )
            )
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        _check_last_dim(
            "ColumnParallelLinear", input_, self.input_size, "pass the full (unsharded) features to this layer."
        )
        input_parallel = copy_to_tensor_model_parallel_region(input_, self.tensor_parallel_group)
        output_parallel = F.linear(input_parallel, self.weight, self.bias)
        if self.gather_output:
            return gather_from_tensor_model_parallel_region(output_parallel, self.tensor_parallel_group)
        return output_parallel

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size} "
            f"({self.output_size_per_partition} per rank), bias={self.bias is not None}, "
            f"gather_output={self.gather_output}"
        )


class RowParallelLinear(_TensorParallelModule):
    """Y = XA + b with A split along its input dimension and X along its last.

    Each rank computes X_i A_i; the partial results are all-reduced and the
    (replicated) bias added. With `input_is_parallel=False` the input is split
    across the TP group first.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        stride: int = 1,
        init_method=linear_weight_init,
        tensor_parallel_group=None,
    ):
        super().__init__()
        self.tensor_parallel_group = _group_or_default(tensor_parallel_group)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.input_size_per_partition = divide(input_size, world, "RowParallelLinear input_size")
        device = device or None  # the seed documents device=False as the default
        self.weight = nn.Parameter(
            sharded_master((output_size, input_size), init_method, 1, stride, rank, world, dtype, device)
        )
        set_tensor_model_parallel_attributes(self.weight, True, 1, stride)
        if bias:
            bias_tensor = torch.empty(output_size, dtype=dtype, device=device)
            with torch.no_grad():
                linear_bias_init(bias_tensor, input_size)
            self.bias = nn.Parameter(bias_tensor)
            set_tensor_model_parallel_attributes(self.bias, False, 0, 1)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.input_is_parallel:
            _check_last_dim(
                "RowParallelLinear(input_is_parallel=True)",
                input_,
                self.input_size_per_partition,
                "pass this rank's shard of the features (the output of a ColumnParallelLinear "
                "with gather_output=False), or set input_is_parallel=False.",
            )
            input_parallel = input_
        else:
            _check_last_dim(
                "RowParallelLinear",
                input_,
                self.input_size,
                "pass the full features, or their shard with input_is_parallel=True.",
            )
            input_parallel = scatter_to_tensor_model_parallel_region(input_, self.tensor_parallel_group)
        output = reduce_from_tensor_model_parallel_region(
            F.linear(input_parallel, self.weight), self.tensor_parallel_group
        )
        return output + self.bias if self.bias is not None else output

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size} ({self.input_size_per_partition} per rank), "
            f"output_size={self.output_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}"
        )


class ParallelEmbedding(_TensorParallelModule):
    """torch.nn.Embedding with its table sharded across the TP group.

    By default the vocabulary (rows) is sharded: each rank looks up the ids in
    its range and the partial results are all-reduced. With
    `shard_across_embedding=True` the embedding dimension (columns) is sharded
    and the lookups are all-gathered instead.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        init_method=init.normal_,
        dtype: torch.dtype = torch.float32,
        device=None,
        padding_idx: int | None = None,
        shard_across_embedding: bool = False,
        tensor_parallel_group=None,
    ):
        super().__init__()
        self.tensor_parallel_group = _group_or_default(tensor_parallel_group)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise InputShapeError(f"padding_idx {padding_idx} is outside the vocabulary of {num_embeddings}.")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.shard_across_embedding = shard_across_embedding
        partition_dim = 1 if shard_across_embedding else 0
        sharded_size = embedding_dim if shard_across_embedding else num_embeddings
        what = "ParallelEmbedding embedding_dim" if shard_across_embedding else "ParallelEmbedding num_embeddings"
        per_rank = divide(sharded_size, world, what)
        self.vocab_start_index = 0 if shard_across_embedding else rank * per_rank
        self.vocab_end_index = num_embeddings if shard_across_embedding else (rank + 1) * per_rank

        master = torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device or None)
        with torch.no_grad():
            init_method(master)
            if self.padding_idx is not None:
                master[self.padding_idx].fill_(0)
        self.weight = nn.Parameter(shard_of(master, partition_dim, 1, rank, world))
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim, 1)

    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is None or not self.vocab_start_index <= self.padding_idx < self.vocab_end_index:
            return None
        return self.padding_idx - self.vocab_start_index

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if input_.is_floating_point():
            raise InputShapeError(f"ParallelEmbedding expects integer token ids, got {input_.dtype}.")
        if not torch.compiler.is_compiling() and input_.numel() and (
            int(input_.min()) < 0 or int(input_.max()) >= self.num_embeddings
        ):
            raise InputShapeError(
                f"ParallelEmbedding got token ids outside [0, {self.num_embeddings}); "
                f"found ids from {int(input_.min())} to {int(input_.max())}."
            )
        group = self.tensor_parallel_group
        if self.shard_across_embedding:
            output_parallel = F.embedding(input_, self.weight, self._local_padding_idx())
            return gather_from_tensor_model_parallel_region(output_parallel, group)
        if dist.get_world_size(group) == 1:
            return F.embedding(input_, self.weight, self._local_padding_idx())
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        output_parallel = F.embedding(local_ids, self.weight, self._local_padding_idx())
        output_parallel = output_parallel.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(output_parallel, group)

    def extra_repr(self) -> str:
        sharded = "embedding_dim" if self.shard_across_embedding else "num_embeddings"
        return f"{self.num_embeddings}, {self.embedding_dim}, sharded along {sharded}"

"""Tensor-parallel drop-ins for torch.nn.Linear, torch.nn.Embedding and torch.nn.Conv2d.

Sharded parameters carry `tensor_model_parallel`, `partition_dim`, `partition_stride`
and `num_partitions`; replicated ones carry `tensor_model_parallel=False`; so do the
layers' `state_dict()` entries. Parameters whose gradient sequence parallelism leaves
partial across the TP group carry `sequence_parallel_enabled=True` (see
`grads.allreduce_sequence_parallel_gradients`).

Each layer takes its TP process group at construction as `tensor_model_parallel_group`
(upstream's name; `tensor_parallel_group` is accepted too), default: the one
`parallel_state` set up. Sizes and option combinations are checked before any
rank-dependent work, so a bad layer raises on every rank alike.

Sequence parallelism (Megatron-style, as upstream): activations outside the
Column -> Row region are split along `sequence_dimension` (default 0, `[seq, batch,
hidden]`) across the TP group. A sequence-parallel Column layer all-gathers its input
and reduce-scatters the input's gradient; a sequence-parallel Row layer reduce-scatters
its output instead of all-reducing it; a sequence-parallel embedding returns its
chunk of the sequence.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from ..errors import InputShapeError, LayerConfigError, LayerFeatureNotSupportedError
from . import parallel_state
from .initialization import initialized_master, linear_bias_init, linear_weight_init, shard_of
from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region_with_dim,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_input_channels_to_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .utils import copy_attributes_to_state_dict, divide, set_tensor_model_parallel_attributes


class _TensorParallelModule(nn.Module):
    """A module whose `state_dict()` entries carry the TP attributes of its parameters."""

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(copy_attributes_to_state_dict)


def _resolve_group(layer: str, tensor_model_parallel_group, tensor_parallel_group):
    if tensor_model_parallel_group is not None and tensor_parallel_group is not None:
        if tensor_model_parallel_group is not tensor_parallel_group:
            raise LayerConfigError(
                f"{layer} got two different groups as tensor_model_parallel_group and tensor_parallel_group "
                "(the same argument under two names); pass one of them."
            )
    group = tensor_model_parallel_group if tensor_model_parallel_group is not None else tensor_parallel_group
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def _check_sizes(layer: str, **sizes) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LayerConfigError(f"{layer} {name} must be a positive integer, got {value!r}.")


def _check_pad(layer: str, pad: bool, size: int, world: int, what: str) -> None:
    if pad and size % world != 0:
        raise LayerFeatureNotSupportedError(
            f"{layer}(pad=True): padding {what} ({size}) to a multiple of the tensor parallel size ({world}) "
            f"is not implemented yet; choose a {what} that {world} divides (pad=True is then a no-op)."
        )


def _sequence_dimension(sequence_dimension) -> int:
    """Upstream's `sequence_dimension=None` means dimension 0 (`[seq, batch, hidden]`)."""
    return 0 if sequence_dimension is None else int(sequence_dimension)


def _check_last_dim(layer: str, input_: torch.Tensor, expected: int, hint: str) -> None:
    if input_.dim() == 0 or input_.shape[-1] != expected:
        raise InputShapeError(
            f"{layer} expects inputs whose last dimension is {expected}, got shape {tuple(input_.shape)}; {hint}"
        )


def _initialize_parameter_cpu(
    param: torch.Tensor,
    partition_dim: int,
    num_partitions,
    init_method=None,
    return_master_param: bool = False,
    *,
    param_dtype: torch.dtype = torch.float32,
    stride: int = 1,
):
    """Fill `param` (already of its per-rank shape) with this rank's shard of a master initialized by `init_method`.

    Upstream's helper, in both of its 2.x signatures: `(param, partition_dim, num_partitions,
    init_method, return_master_param=False)` (current) and `(param, partition_dim,
    init_method, return_master_param=False)` (earlier 2.x: a callable third argument).
    The master has `param`'s shape with `partition_dim` times the TP size of
    `parallel_state`; it is built on every rank (same seed: same master), then sliced as
    the layers slice it (`stride` blocks per rank). `num_partitions` must be that TP size
    (upstream only records it). Marks `param` as sharded and returns the master when
    `return_master_param`.
    """
    world = parallel_state.get_tensor_model_parallel_size()
    if callable(num_partitions):
        num_partitions, init_method, return_master_param = world, num_partitions, bool(init_method or return_master_param)
    if init_method is None or not callable(init_method):
        raise LayerConfigError(
            f"_initialize_parameter_cpu needs an init_method callable (e.g. torch.nn.init.normal_), got {init_method!r}."
        )
    if num_partitions != world:
        raise LayerConfigError(
            f"_initialize_parameter_cpu got num_partitions={num_partitions!r}, but the tensor parallel size is {world}; "
            "pass parallel_state.get_tensor_model_parallel_size()."
        )
    rank = parallel_state.get_tensor_model_parallel_rank()
    full_shape = list(param.shape)
    full_shape[partition_dim] *= world
    master = initialized_master(tuple(full_shape), init_method, param_dtype, param.device)
    with torch.no_grad():
        param.copy_(shard_of(master, partition_dim, stride, rank, world))
    set_tensor_model_parallel_attributes(param, True, partition_dim, stride, world)
    return master if return_master_param else None


def _shard_parameter(master: torch.Tensor, partition_dim: int, stride: int, rank: int, world: int) -> nn.Parameter:
    param = nn.Parameter(shard_of(master, partition_dim, stride, rank, world))
    set_tensor_model_parallel_attributes(param, True, partition_dim, stride, world)
    return param


def _replicated_parameter(tensor: torch.Tensor, world: int) -> nn.Parameter:
    param = nn.Parameter(tensor)
    set_tensor_model_parallel_attributes(param, False, 0, 1, world)
    return param


class BaseParallelLinear(_TensorParallelModule):
    """Upstream's common base of ColumnParallelLinear and RowParallelLinear, for `isinstance` checks."""


class ColumnParallelLinear(BaseParallelLinear):
    """Y = XA + b with A split along its output dimension across the TP group.

    Each rank computes Y_i = X A_i (+ b_i). With `gather_output=True` the shards are
    all-gathered so every rank holds Y, and the bias is the full, replicated vector
    added after the gather (upstream's layout); otherwise each keeps Y_i (the input of a
    following RowParallelLinear with `input_is_parallel=True`) and holds its bias shard.

    Upstream arguments, as here:
      - `sequence_parallel_enabled`: the input is this rank's chunk of `sequence_dimension`;
        it is all-gathered forward (the gradient reduce-scattered backward) instead of the
        usual all-reduce of the input gradient. Needs `gather_output=False`. The gathered
        input is kept for the weight gradient (no second all-gather in backward).
      - `skip_bias_add`: return `(output, bias)` without adding the bias (to fuse it later).
      - `keep_master_weight`: keep the full initial weight as `self.master_weight` (a plain
        tensor, not a parameter; None otherwise).
      - `reduce_dtype`: dtype of the input-gradient all-reduce (or reduce-scatter); the
        gradient comes back in its own dtype. A no-op for float32 layers.
      - `pad`: accepted; sizes the TP size does not divide raise LayerFeatureNotSupportedError
        (upstream pads for inference; not implemented here yet).
    With `stride` > 1 and `gather_output=True` the gathered output is put back in the
    unsharded layer's order (upstream leaves it in shard order).
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
        init_method=None,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int | None = None,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
        tensor_model_parallel_group=None,
        reduce_dtype: torch.dtype = torch.float32,
        *,
        tensor_parallel_group=None,
    ):
        super().__init__()
        name = "ColumnParallelLinear"
        _check_sizes(name, input_size=input_size, output_size=output_size, stride=stride)
        if sequence_parallel_enabled and gather_output:
            raise LayerConfigError(
                f"{name}(sequence_parallel_enabled=True) needs gather_output=False: its output stays sharded "
                "for a following RowParallelLinear(input_is_parallel=True, sequence_parallel_enabled=True)."
            )
        self.tensor_parallel_group = _resolve_group(name, tensor_model_parallel_group, tensor_parallel_group)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        _check_pad(name, pad, output_size, world, "output_size")
        self.output_size_per_partition = divide(output_size, world, what=f"{name} output_size")
        divide(output_size, world * stride, what=f"{name} output_size (with stride={stride})")
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.skip_bias_add, self.pad, self.stride = gather_output, skip_bias_add, pad, stride
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.reduce_dtype = reduce_dtype
        device = device or None  # the seed documents device=False as the default

        master = initialized_master((output_size, input_size), init_method or linear_weight_init, dtype, device)
        self.weight = _shard_parameter(master, 0, stride, rank, world)
        self.master_weight = master if keep_master_weight else None
        if bias:
            full_bias = initialized_master((output_size,), partial(linear_bias_init, fan_in=input_size), dtype, device)
            if gather_output:
                self.bias = _replicated_parameter(full_bias, world)
            else:
                self.bias = _shard_parameter(full_bias, 0, stride, rank, world)
        else:
            self.register_parameter("bias", None)

    def _in_unsharded_order(self, gathered: torch.Tensor) -> torch.Tensor:
        """Gathered output columns, from shard order back to the unsharded layer's order (stride > 1)."""
        world = dist.get_world_size(self.tensor_parallel_group)
        if self.stride == 1 or world == 1:
            return gathered
        block = self.output_size // (world * self.stride)
        return gathered.unflatten(-1, (world, self.stride, block)).transpose(-3, -2).flatten(-3)

    def forward(self, input_: torch.Tensor):
        _check_last_dim(
            "ColumnParallelLinear", input_, self.input_size, "pass the full (unsharded) features to this layer."
        )
        group = self.tensor_parallel_group
        if self.sequence_parallel_enabled:
            input_parallel = gather_from_sequence_parallel_region(
                input_, True, self.sequence_dimension, group, reduce_dtype=self.reduce_dtype
            )
        else:
            input_parallel = copy_to_tensor_model_parallel_region(input_, group, reduce_dtype=self.reduce_dtype)
        bias_in_matmul = self.bias is not None and not self.gather_output and not self.skip_bias_add
        output = F.linear(input_parallel, self.weight, self.bias if bias_in_matmul else None)
        if self.gather_output:
            output = self._in_unsharded_order(gather_from_tensor_model_parallel_region(output, group))
            if self.bias is not None and not self.skip_bias_add:
                output = output + self.bias
        if self.skip_bias_add:
            return output, self.bias
        return output

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size} "
            f"({self.output_size_per_partition} per rank), bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, sequence_parallel_enabled={self.sequence_parallel_enabled}"
        )


class RowParallelLinear(BaseParallelLinear):
    """Y = XA + b with A split along its input dimension and X along its last.

    Each rank computes X_i A_i; the partial results are all-reduced and the
    (replicated) bias added. With `input_is_parallel=False` the input is split
    across the TP group first.

    Upstream arguments, as here:
      - `sequence_parallel_enabled`: reduce-scatter the output along `sequence_dimension`
        instead of all-reducing it (each rank keeps its chunk of the sequence); needs
        `input_is_parallel=True`. The bias is then marked `sequence_parallel_enabled`: its
        gradient covers this rank's chunk only until `allreduce_sequence_parallel_gradients`.
      - `reduce_output=False`: return this rank's partial sum without any reduction (the
        caller reduces). Needs `skip_bias_add=True` or `bias=False`, since a bias added to
        every partial sum would be counted once per rank (upstream adds it anyway).
      - `skip_bias_add`, `keep_master_weight`, `reduce_dtype`, `pad`: as ColumnParallelLinear.
    The bias is initialized as torch.nn.Linear's (fan-in: the full `input_size`; upstream uses
    the per-rank input size), so TP=1 equals torch.nn.Linear.
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
        init_method=None,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int | None = None,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
        tensor_model_parallel_group=None,
        reduce_output: bool = True,
        reduce_dtype: torch.dtype = torch.float32,
        *,
        tensor_parallel_group=None,
    ):
        super().__init__()
        name = "RowParallelLinear"
        _check_sizes(name, input_size=input_size, output_size=output_size, stride=stride)
        if sequence_parallel_enabled and not input_is_parallel:
            raise LayerConfigError(
                f"{name}(sequence_parallel_enabled=True) needs input_is_parallel=True: its input is the "
                "sharded output of a ColumnParallelLinear(gather_output=False)."
            )
        if sequence_parallel_enabled and not reduce_output:
            raise LayerConfigError(f"{name}: sequence_parallel_enabled=True reduce-scatters the output; drop reduce_output=False.")
        if not reduce_output and bias and not skip_bias_add:
            raise LayerConfigError(
                f"{name}(reduce_output=False) returns partial sums, and a bias added to each would be counted "
                "once per rank; pass skip_bias_add=True (add it after your reduction) or bias=False."
            )
        if stride > 1 and not input_is_parallel:
            raise LayerConfigError(
                f"{name}(stride={stride}) shards its input features in strided blocks; pass the matching "
                "sharded input with input_is_parallel=True."
            )
        self.tensor_parallel_group = _resolve_group(name, tensor_model_parallel_group, tensor_parallel_group)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        _check_pad(name, pad, input_size, world, "input_size")
        self.input_size_per_partition = divide(input_size, world, what=f"{name} input_size")
        divide(input_size, world * stride, what=f"{name} input_size (with stride={stride})")
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel, self.skip_bias_add, self.pad = input_is_parallel, skip_bias_add, pad
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.reduce_output, self.reduce_dtype = reduce_output, reduce_dtype
        device = device or None  # the seed documents device=False as the default

        master = initialized_master((output_size, input_size), init_method or linear_weight_init, dtype, device)
        self.weight = _shard_parameter(master, 1, stride, rank, world)
        self.master_weight = master if keep_master_weight else None
        if bias:
            full_bias = initialized_master((output_size,), partial(linear_bias_init, fan_in=input_size), dtype, device)
            self.bias = _replicated_parameter(full_bias, world)
            self.bias.sequence_parallel_enabled = sequence_parallel_enabled
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor):
        group = self.tensor_parallel_group
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
            input_parallel = scatter_to_tensor_model_parallel_region(input_, group)
        output = F.linear(input_parallel, self.weight)
        if self.sequence_parallel_enabled:
            output = reduce_scatter_to_sequence_parallel_region(
                output, self.sequence_dimension, group, reduce_dtype=self.reduce_dtype
            )
        elif self.reduce_output:
            output = reduce_from_tensor_model_parallel_region(output, group, reduce_dtype=self.reduce_dtype)
        if self.skip_bias_add:
            return output, self.bias
        return output + self.bias if self.bias is not None else output

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size} ({self.input_size_per_partition} per rank), "
            f"output_size={self.output_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, sequence_parallel_enabled={self.sequence_parallel_enabled}"
        )


class ParallelEmbedding(_TensorParallelModule):
    """torch.nn.Embedding with its table sharded across the TP group (upstream's argument order).

    By default the vocabulary (rows) is sharded: each rank looks up the ids in
    its range and the partial results are all-reduced. With
    `shard_across_embedding=True` the embedding dimension (columns) is sharded
    and the lookups are all-gathered instead.

    - `sequence_parallel_enabled`: return this rank's chunk of `sequence_dimension` of the
      output (a reduce-scatter replaces the all-reduce of vocabulary sharding). The
      dimension counts in the output, whose last dimension is `embedding_dim`.
    - `collect_output=False`: return this rank's partial result without the collective:
      its lookups with zeros for ids outside its vocabulary range (their sum over the
      TP group is the embedding), or its columns with `shard_across_embedding=True`.
    - `padding_idx` 0 and negative indices work as in torch.nn.Embedding (upstream drops 0).
    - `max_norm` renormalizes only the rows the ids look up, as torch.nn.Embedding does.
      Not supported with `shard_across_embedding=True` at TP > 1 (a row's norm spans ranks);
      neither is `scale_grad_by_freq` with vocabulary sharding at TP > 1.
    - `pad`: as ColumnParallelLinear.

    Ids are checked against the vocabulary with a typed error on CPU. On accelerators the
    check runs on the device (`torch._assert_async`, no host sync per step): an id out of
    range fails the device's next synchronization with a device-side assert.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        init_method=init.normal_,
        device=None,
        dtype: torch.dtype = torch.float32,
        shard_across_embedding: bool = False,
        pad: bool = False,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int | None = None,
        tensor_model_parallel_group=None,
        collect_output: bool = True,
        *,
        tensor_parallel_group=None,
    ):
        super().__init__()
        name = "ParallelEmbedding"
        _check_sizes(name, num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        if callable(padding_idx):
            raise LayerConfigError(
                f"{name}'s third argument is padding_idx (upstream's and torch.nn.Embedding's order), got the "
                f"callable {padding_idx!r}; pass init_method=... by keyword."
            )
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)):
            raise LayerConfigError(f"padding_idx must be an int or None, got {padding_idx!r}.")
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise LayerConfigError(f"padding_idx {padding_idx} is outside the vocabulary of {num_embeddings}.")
        if sequence_parallel_enabled and not collect_output:
            raise LayerConfigError(f"{name}: sequence_parallel_enabled=True collects the output; drop collect_output=False.")
        self.tensor_parallel_group = _resolve_group(name, tensor_model_parallel_group, tensor_parallel_group)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        sharded_size, what = (embedding_dim, "embedding_dim") if shard_across_embedding else (num_embeddings, "num_embeddings")
        _check_pad(name, pad, sharded_size, world, what)
        per_rank = divide(sharded_size, world, what=f"{name} {what}")
        if world > 1 and shard_across_embedding and max_norm is not None:
            raise LayerFeatureNotSupportedError(
                f"{name}(max_norm=...) with shard_across_embedding=True is not supported at TP > 1 (each row's "
                "norm spans ranks); shard the vocabulary instead (shard_across_embedding=False)."
            )
        if world > 1 and not shard_across_embedding and scale_grad_by_freq:
            raise LayerFeatureNotSupportedError(
                f"{name}(scale_grad_by_freq=True) is not supported with vocabulary sharding at TP > 1; "
                "use shard_across_embedding=True."
            )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        self.shard_across_embedding, self.pad, self.collect_output = shard_across_embedding, pad, collect_output
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.vocab_start_index = 0 if shard_across_embedding else rank * per_rank
        self.vocab_end_index = num_embeddings if shard_across_embedding else (rank + 1) * per_rank

        def initialize(master):
            init_method(master)
            if self.padding_idx is not None:
                master[self.padding_idx].fill_(0)

        master = initialized_master((num_embeddings, embedding_dim), initialize, dtype, device or None)
        self.weight = _shard_parameter(master, 1 if shard_across_embedding else 0, 1, rank, world)

    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is None or not self.vocab_start_index <= self.padding_idx < self.vocab_end_index:
            return None
        return self.padding_idx - self.vocab_start_index

    def _check_ids(self, input_: torch.Tensor) -> None:
        if input_.dtype == torch.bool or input_.is_floating_point() or input_.is_complex():
            raise InputShapeError(f"ParallelEmbedding expects integer token ids, got {input_.dtype}.")
        if not input_.numel() or torch.compiler.is_compiling():
            return
        if input_.device.type == "cpu":
            low, high = (int(v) for v in torch.aminmax(input_))
            if low < 0 or high >= self.num_embeddings:
                raise InputShapeError(
                    f"ParallelEmbedding got token ids outside [0, {self.num_embeddings}); found ids from {low} to {high}."
                )
        else:
            in_range = ((input_ >= 0) & (input_ < self.num_embeddings)).all()
            torch._assert_async(in_range, f"ParallelEmbedding got token ids outside [0, {self.num_embeddings})")

    def _lookup(self, ids: torch.Tensor, max_norm) -> torch.Tensor:
        return F.embedding(
            ids, self.weight, self._local_padding_idx(), max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        self._check_ids(input_)
        group = self.tensor_parallel_group
        if self.shard_across_embedding:
            output = self._lookup(input_, self.max_norm)
            if not self.collect_output:
                return output
            output = gather_from_tensor_model_parallel_region(output, group)
            if self.sequence_parallel_enabled:
                output = scatter_to_sequence_parallel_region(output, self.sequence_dimension, group)
            return output
        if dist.get_world_size(group) == 1:
            output = self._lookup(input_, self.max_norm)
        else:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
            if self.max_norm is not None:
                # Renormalize only the rows these ids look up (the masked ones map to row 0 too).
                with torch.no_grad():
                    torch.embedding_renorm_(self.weight, local_ids[~outside], self.max_norm, self.norm_type)
            output = self._lookup(local_ids, None).masked_fill(outside.unsqueeze(-1), 0.0)
        if not self.collect_output:
            return output
        if self.sequence_parallel_enabled:
            return reduce_scatter_to_sequence_parallel_region(output, self.sequence_dimension, group)
        return reduce_from_tensor_model_parallel_region(output, group)

    def extra_repr(self) -> str:
        sharded = "embedding_dim" if self.shard_across_embedding else "num_embeddings"
        return f"{self.num_embeddings}, {self.embedding_dim}, sharded along {sharded}"


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value
    raise LayerConfigError(f"{name} must be an int or a tuple of two ints, got {value!r}.")


class BaseParallelConv(_TensorParallelModule):
    """torch.nn.Conv2d with its kernel sharded along output (dim 0) or input (dim 1) channels.

    Upstream's common base of the channel-parallel conv layers; code that finds them with
    `isinstance` / `BaseParallelConv.__subclasses__()` works unchanged.
    """

    def __init__(
        self,
        name, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
        partition_dim, dtype, device, init_method, keep_master_weight, tensor_model_parallel_group,
    ):
        super().__init__()
        _check_sizes(name, in_channels=in_channels, out_channels=out_channels)
        self.kernel_size, self.stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        if groups != 1 or padding_mode != "zeros":
            raise LayerFeatureNotSupportedError(
                f"{name} supports groups=1 and padding_mode='zeros' (as upstream), got groups={groups!r}, "
                f"padding_mode={padding_mode!r}."
            )
        self.tensor_parallel_group = _resolve_group(name, tensor_model_parallel_group, None)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        sharded, what = (out_channels, "out_channels") if partition_dim == 0 else (in_channels, "in_channels")
        self.channels_per_partition = divide(sharded, world, what=f"{name} {what}")
        self.in_channels, self.out_channels = in_channels, out_channels
        device = device or None

        master = initialized_master(
            (out_channels, in_channels, *self.kernel_size), init_method or linear_weight_init, dtype, device
        )
        self.weight = _shard_parameter(master, partition_dim, 1, rank, world)
        self.master_weight = master if keep_master_weight else None
        self.master_bias = None
        if bias:
            fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
            full_bias = initialized_master((out_channels,), partial(linear_bias_init, fan_in=fan_in), dtype, device)
            self.master_bias = full_bias.clone() if keep_master_weight else None
            if partition_dim == 0:
                self.bias = _shard_parameter(full_bias, 0, 1, rank, world)
            else:
                self.bias = _replicated_parameter(full_bias, world)
        else:
            self.register_parameter("bias", None)

    def _conv(self, input_: torch.Tensor, bias) -> torch.Tensor:
        return F.conv2d(input_, self.weight, bias, self.stride, self.padding, self.dilation)

    def _check_channels(self, input_: torch.Tensor, expected: int, hint: str) -> None:
        if input_.dim() != 4 or input_.shape[1] != expected:
            raise InputShapeError(
                f"{type(self).__name__} expects [N, C, H, W] inputs with C = {expected}, "
                f"got shape {tuple(input_.shape)}; {hint}"
            )


class OutputChannelParallelConv2d(BaseParallelConv):
    """torch.nn.Conv2d with its output channels sharded across the TP group (upstream's signature).

    Each rank computes its output channels (bias included); with `gather_output=True` they
    are all-gathered along the channel dimension. `keep_master_weight` keeps the full
    initial kernel and bias as `master_weight` / `master_bias`. Supports `dilation`
    (upstream does not); `groups` and `padding_mode` other than 1 and 'zeros' raise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        init_method=None,
        keep_master_weight: bool = False,
        tensor_model_parallel_group=None,
    ):
        super().__init__(
            "OutputChannelParallelConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, 0, dtype, device, init_method, keep_master_weight, tensor_model_parallel_group,
        )
        self.gather_output = gather_output

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        self._check_channels(input_, self.in_channels, "pass every input channel.")
        group = self.tensor_parallel_group
        output = self._conv(copy_to_tensor_model_parallel_region(input_, group), self.bias)
        if self.gather_output:
            return gather_from_tensor_model_parallel_region_with_dim(output, 1, group)
        return output


class InputChannelParallelConv2d(BaseParallelConv):
    """torch.nn.Conv2d with its input channels sharded across the TP group (upstream's signature).

    Each rank convolves its input channels; the partial outputs are all-reduced and the
    replicated bias added. With `input_is_parallel=False` the input channels are split
    first. Otherwise as OutputChannelParallelConv2d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        init_method=None,
        keep_master_weight: bool = False,
        tensor_model_parallel_group=None,
    ):
        super().__init__(
            "InputChannelParallelConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, 1, dtype, device, init_method, keep_master_weight, tensor_model_parallel_group,
        )
        self.input_is_parallel = input_is_parallel

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        group = self.tensor_parallel_group
        if self.input_is_parallel:
            self._check_channels(input_, self.channels_per_partition, "pass this rank's shard of the channels.")
        else:
            self._check_channels(input_, self.in_channels, "pass every input channel, or their shard with input_is_parallel=True.")
            input_ = scatter_input_channels_to_tensor_model_parallel_region(input_, group)
        output = reduce_from_tensor_model_parallel_region(self._conv(input_, None), group)
        return output + self.bias[:, None, None] if self.bias is not None else output

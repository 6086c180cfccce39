"""Tensor-parallel drop-ins for torch.nn.Linear, torch.nn.Embedding and torch.nn.Conv2d.

Sharded parameters carry `tensor_model_parallel`, `partition_dim`, `partition_stride`
and `num_partitions`; replicated ones carry `tensor_model_parallel=False`; so do the
layers' `state_dict()` entries. Each layer also keeps its parameters' layouts as its own
data (`parameter_layouts()`, see `layouts`), which checkpoints read. Parameters whose
gradient sequence parallelism leaves partial across the TP group carry `sequence_parallel_enabled=True` (see
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

Where the parameters go and how they are initialized (`device`, and our `exact_slice_init`):

- `exact_slice_init=True` (the same-seed contract): every rank builds the full master
  weight on `device` itself (never on the host for an accelerator), initializes it with
  `init_method` from the default generator, and keeps its slice, so the shards of a TP=N
  layer are exactly the slices of the TP=1 layer built with the same seed. Costs, per
  rank and per layer, the full weight's memory on `device` while it is built and the
  full initialization's work.
- `exact_slice_init=False`: only this rank's shard is allocated on `device` and
  initialized there, from the tracker's per-TP-rank stream (`model_parallel_xla_manual_seed`
  must have run): the same distribution, different numbers. The default initializations
  use the full layer's fan-in; a custom `init_method` is called on the shard (its fans are
  the shard's). Costs nothing beyond the shard.
- `None` (default): True on CPU, at TP=1 and with `keep_master_weight`; False on any
  other device (upstream initializes the shard on its device too). On `device="meta"` no
  values are drawn and no memory is allocated: the parameters have their shard shapes.

Replicated parameters (biases added after a collective) are built whole from the default
generator either way. No forward or backward reads a tensor back to the host (no
`.item()`, no data-dependent shapes), so a step never waits for an accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from .. import comm
from ..errors import (
    CheckpointShapeError,
    InputShapeError,
    LayerConfigError,
    LayerFeatureNotSupportedError,
    RNGStateTrackerError,
)
from . import parallel_state
from .layouts import DeclaresLayouts
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
from .random import _MODEL_PARALLEL_RNG_TRACKER_NAME, get_rng_state_tracker
from .utils import (
    copy_attributes_to_state_dict,
    divide,
    get_padding_length,
    set_tensor_model_parallel_attributes,
)
from .weight_loading import set_weight_loader


class _TensorParallelModule(DeclaresLayouts, nn.Module):
    """A module that declares each parameter's layout (`parameter_layouts()`), and whose `state_dict()`
    entries carry the TP attributes of its parameters (the compatibility view)."""

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


def _pad_size(layer: str, pad: bool, size: int, world: int, stride: int, what: str) -> int:
    """How many zero features `pad=True` appends to `size` (upstream: up to a multiple of the TP size)."""
    extra = get_padding_length(size, world) if pad else 0
    if extra and stride > 1:
        raise LayerFeatureNotSupportedError(
            f"{layer}(pad=True, stride={stride}): a strided (fused) weight cannot be padded; choose a {what} "
            f"({size} now) that {world * stride} divides."
        )
    return extra


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


def _layer_device(device) -> torch.device:
    """Where a layer's parameters go: `device`, or torch's default device for None (and the seed's False)."""
    if device is None or device is False:
        return torch.get_default_device()
    return torch.device(device)


def _use_exact_slice_init(layer: str, exact_slice_init, keep_master_weight: bool, device: torch.device, world: int) -> bool:
    """Resolve `exact_slice_init` (None: True on CPU, at TP=1 and with keep_master_weight; False elsewhere)."""
    if exact_slice_init is None:
        return bool(keep_master_weight) or world == 1 or device.type == "cpu"
    if not isinstance(exact_slice_init, bool):
        raise LayerConfigError(f"{layer} exact_slice_init must be True, False or None, got {exact_slice_init!r}.")
    if keep_master_weight and not exact_slice_init:
        raise LayerConfigError(
            f"{layer}(keep_master_weight=True) keeps the full master weight, which exact_slice_init=False never "
            "builds; drop one of the two."
        )
    return exact_slice_init


@dataclass(frozen=True)
class _ShardLayout:
    """How one sharded parameter maps onto its full, unpadded tensor.

    The full tensor has `full_shape`; along `dim` it is padded with zeros at its end to
    `padded_size` (a multiple of `world`; equal to `full_shape[dim]` without padding), then
    cut as `shard_of` cuts (`stride` blocks per rank). Padding needs stride 1.
    """

    full_shape: tuple[int, ...]
    dim: int
    stride: int
    padded_size: int
    rank: int
    world: int

    @property
    def per_rank(self) -> int:
        return self.padded_size // self.world

    @property
    def shard_shape(self) -> tuple[int, ...]:
        return tuple(self.per_rank if d == self.dim else n for d, n in enumerate(self.full_shape))

    @property
    def real(self) -> int:
        """How many of this rank's entries along `dim` hold the full tensor (the rest are padding)."""
        return min(max(self.full_shape[self.dim] - self.rank * self.per_rank, 0), self.per_rank)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of `full` (of `full_shape`), padding included."""
        extra = self.padded_size - full.shape[self.dim]
        if extra:
            zeros = list(full.shape)
            zeros[self.dim] = extra
            full = torch.cat([full, full.new_zeros(zeros)], dim=self.dim)
        return shard_of(full, self.dim, self.stride, self.rank, self.world)

    def load(self, full_shape, read) -> torch.Tensor:
        """The weight loader of a padded parameter: the full, unpadded checkpoint tensor to the padded shard.

        Only the unpadded shape is taken: a tensor of the padded size could hold a real
        feature where the padding goes, and would lose it silently.
        """
        if tuple(full_shape) != self.full_shape:
            raise CheckpointShapeError(
                f"a parameter padded from full shape {self.full_shape} got a checkpoint tensor of shape "
                f"{tuple(full_shape)}; load the unpadded tensor (slice the padding off a merged padded one)."
            )
        start = self.rank * self.per_rank
        if self.real == self.per_rank:
            return read(self.dim, start, start + self.per_rank)
        part = read(self.dim, start, start + self.real) if self.real else None
        shard = torch.zeros(self.shard_shape, dtype=part.dtype, device=part.device) if part is not None else \
            torch.zeros(self.shard_shape)
        if part is not None:
            shard.narrow(self.dim, 0, self.real).copy_(part)
        return shard


def _as_sharded(tensor: torch.Tensor, layout: _ShardLayout, requires_grad: bool = True) -> nn.Parameter:
    param = nn.Parameter(tensor, requires_grad=requires_grad)
    set_tensor_model_parallel_attributes(param, True, layout.dim, layout.stride, layout.world)
    if layout.padded_size != layout.full_shape[layout.dim]:
        set_weight_loader(param, layout.load)
    return param


def _model_parallel_rng(layer: str):
    """The tracker's per-TP-rank stream, which draws the shards of `exact_slice_init=False`."""
    tracker = get_rng_state_tracker()
    if _MODEL_PARALLEL_RNG_TRACKER_NAME not in tracker.get_states():
        raise RNGStateTrackerError(
            f"{layer} initializes each shard on its own device (exact_slice_init=False) from the tensor-parallel "
            "RNG stream; call parallel_layers.random.model_parallel_xla_manual_seed(seed) first, or pass "
            "exact_slice_init=True (build the full weight, then slice it)."
        )
    return tracker.fork()


def _sharded_parameter(layer: str, layout: _ShardLayout, init_full, init_shard, dtype, device: torch.device, exact: bool):
    """(this rank's shard of a new parameter, its full unpadded master or None).

    `exact`: the master is built on `device` with `init_full`, padded, and sliced.
    Otherwise only the shard is allocated on `device` and filled by `init_shard` from
    the tracker's per-TP-rank stream (nothing is filled on the meta device).
    """
    if exact:
        master = initialized_master(layout.full_shape, init_full, dtype, device)
        return _as_sharded(layout.cut(master), layout), master
    shard = torch.empty(layout.shard_shape, dtype=dtype, device=device)
    if device.type != "meta":
        with _model_parallel_rng(layer), torch.no_grad():
            init_shard(shard)
            shard.narrow(layout.dim, layout.real, layout.per_rank - layout.real).zero_()
    return _as_sharded(shard, layout), None


def _resharded(param: nn.Parameter, layout: _ShardLayout, group) -> nn.Parameter:
    """`param`, a stride-1 shard (padded or not) of the full tensor of `layout`, cut again as `layout` says."""
    if param.device.type == "meta":
        tensor = torch.empty(layout.shard_shape, dtype=param.dtype, device=param.device)
    else:
        gathered = comm.all_gather(param.detach(), dim=layout.dim, group=group)
        tensor = layout.cut(gathered.narrow(layout.dim, 0, layout.full_shape[layout.dim]))
    return _as_sharded(tensor, layout, param.requires_grad)


def _replicated_parameter(shape: tuple[int, ...], initializer, dtype, device: torch.device, world: int) -> nn.Parameter:
    param = nn.Parameter(initialized_master(shape, initializer, dtype, device))
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
      - `keep_master_weight`: keep the full initial (unpadded) weight as `self.master_weight`
        (a plain tensor, not a parameter; None otherwise). Needs exact slice initialization.
      - `reduce_dtype`: dtype of the input-gradient all-reduce (or reduce-scatter); the
        gradient comes back in its own dtype. A no-op for float32 layers.
      - `pad`: when the TP size does not divide `output_size`, append zero output features
        up to the next multiple of it (`pad_size` of them, on the last ranks; `output_size`
        is then the padded size, as upstream). The gathered output drops them again; a
        sharded output keeps them (zeros), for a following padded RowParallelLinear, which
        ignores them. Unlike upstream, padded layers train: their padded rows get zero
        gradients and stay zero. Not with `stride` > 1. `parallel_layers.pad.pad_model` pads
        by attention heads instead.
      - `device`, `exact_slice_init` (ours): see the module docstring.
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
        exact_slice_init: bool | None = None,
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
        self.pad_size = _pad_size(name, pad, output_size, world, stride, "output_size")
        padded = output_size + self.pad_size
        self.output_size_per_partition = divide(padded, world, what=f"{name} output_size")
        divide(padded, world * stride, what=f"{name} output_size (with stride={stride})")
        self.input_size, self.output_size = input_size, padded
        self.gather_output, self.skip_bias_add, self.pad, self.stride = gather_output, skip_bias_add, pad, stride
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.reduce_dtype = reduce_dtype
        device = _layer_device(device)
        exact = _use_exact_slice_init(name, exact_slice_init, keep_master_weight, device, world)

        fan_in_uniform = partial(linear_bias_init, fan_in=input_size)  # kaiming_uniform_(a=sqrt(5))'s range
        layout = _ShardLayout((output_size, input_size), 0, stride, padded, rank, world)
        self.weight, master = _sharded_parameter(
            name, layout, init_method or linear_weight_init, init_method or fan_in_uniform, dtype, device, exact
        )
        self.master_weight = master if keep_master_weight else None
        if bias and gather_output:
            self.bias = _replicated_parameter((output_size,), fan_in_uniform, dtype, device, world)
        elif bias:
            bias_layout = _ShardLayout((output_size,), 0, stride, padded, rank, world)
            self.bias, _ = _sharded_parameter(name, bias_layout, fan_in_uniform, fan_in_uniform, dtype, device, exact)
        else:
            self.register_parameter("bias", None)

    def _repad(self, padded_size: int) -> None:
        """Re-shard so that the output features are padded with zeros to `padded_size` (see pad.pad_model).

        A collective over the TP group (the shards are all-gathered); the caller checks the size.
        """
        group = self.tensor_parallel_group
        rank, world, unpadded = dist.get_rank(group), dist.get_world_size(group), self.output_size - self.pad_size
        self.weight = _resharded(self.weight, _ShardLayout((unpadded, self.input_size), 0, 1, padded_size, rank, world), group)
        if self.bias is not None and not self.gather_output:
            self.bias = _resharded(self.bias, _ShardLayout((unpadded,), 0, 1, padded_size, rank, world), group)
        self.output_size, self.pad_size = padded_size, padded_size - unpadded
        self.output_size_per_partition = padded_size // world

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
            if self.pad_size:
                output = output.narrow(-1, 0, self.output_size - self.pad_size)
            if self.bias is not None and not self.skip_bias_add:
                output = output + self.bias
        if self.skip_bias_add:
            return output, self.bias
        return output

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size} "
            f"({self.output_size_per_partition} per rank, {self.pad_size} padding), bias={self.bias is not None}, "
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
      - `pad`: when the TP size does not divide `input_size`, append zero input features up
        to the next multiple of it (`input_size` is then the padded size, as upstream). A
        full input (`input_is_parallel=False`) is padded with zeros before it is split; a
        sharded one must have the padded shard size (a padded ColumnParallelLinear's
        output). Each rank multiplies only the real features of its shard, so the padded
        inputs never reach the output and the padded weight columns get zero gradients.
      - `skip_bias_add`, `keep_master_weight`, `reduce_dtype`, `device`, `exact_slice_init`:
        as ColumnParallelLinear.
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
        exact_slice_init: bool | None = None,
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
        self.pad_size = _pad_size(name, pad, input_size, world, stride, "input_size")
        padded = input_size + self.pad_size
        self.input_size_per_partition = divide(padded, world, what=f"{name} input_size")
        divide(padded, world * stride, what=f"{name} input_size (with stride={stride})")
        self.input_size, self.output_size = padded, output_size
        self.input_is_parallel, self.skip_bias_add, self.pad, self.stride = input_is_parallel, skip_bias_add, pad, stride
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.reduce_output, self.reduce_dtype = reduce_output, reduce_dtype
        device = _layer_device(device)
        exact = _use_exact_slice_init(name, exact_slice_init, keep_master_weight, device, world)

        fan_in_uniform = partial(linear_bias_init, fan_in=input_size)  # kaiming_uniform_(a=sqrt(5))'s range
        layout = _ShardLayout((output_size, input_size), 1, stride, padded, rank, world)
        self.weight, master = _sharded_parameter(
            name, layout, init_method or linear_weight_init, init_method or fan_in_uniform, dtype, device, exact
        )
        self.master_weight = master if keep_master_weight else None
        self._real_input_features = layout.real
        if bias:
            self.bias = _replicated_parameter((output_size,), fan_in_uniform, dtype, device, world)
            self.bias.sequence_parallel_enabled = sequence_parallel_enabled
        else:
            self.register_parameter("bias", None)

    def _repad(self, padded_size: int) -> None:
        """Re-shard so that the input features are padded with zeros to `padded_size` (see pad.pad_model).

        A collective over the TP group (the shards are all-gathered); the caller checks the size.
        """
        group = self.tensor_parallel_group
        rank, world, unpadded = dist.get_rank(group), dist.get_world_size(group), self.input_size - self.pad_size
        layout = _ShardLayout((self.output_size, unpadded), 1, 1, padded_size, rank, world)
        self.weight = _resharded(self.weight, layout, group)
        self.input_size, self.pad_size = padded_size, padded_size - unpadded
        self.input_size_per_partition, self._real_input_features = layout.per_rank, layout.real

    def _partial_product(self, input_parallel: torch.Tensor) -> torch.Tensor:
        """This rank's X_i A_i over the real (unpadded) features of its shard."""
        real = self._real_input_features
        if real == self.input_size_per_partition:
            return F.linear(input_parallel, self.weight)
        return F.linear(input_parallel.narrow(-1, 0, real), self.weight.narrow(1, 0, real))

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
                self.input_size - self.pad_size,
                "pass the full features, or their shard with input_is_parallel=True.",
            )
            if self.pad_size:
                input_ = F.pad(input_, (0, self.pad_size))
            input_parallel = scatter_to_tensor_model_parallel_region(input_, group)
        output = self._partial_product(input_parallel)
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
            f"input_size={self.input_size} ({self.input_size_per_partition} per rank, {self.pad_size} padding), "
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
    - `pad`: when the TP size does not divide the sharded size (`num_embeddings`, or
      `embedding_dim` with `shard_across_embedding=True`), append zero rows (columns) up to
      the next multiple of it; that attribute is then the padded size (as upstream). Ids
      stay checked against the real vocabulary (`vocab_size`), and gathered columns drop
      the padding again.
    - `device`, `exact_slice_init`: as ColumnParallelLinear.

    Ids are checked against the vocabulary on the device, without reading anything back
    to the host (`torch._assert_async`): on CPU that check runs at once and raises
    InputShapeError; on an accelerator an id out of range fails the device's next
    synchronization with a device-side assert (after which the process must restart). A
    sync-free `max_norm` at TP > 1 computes the norm of every row of the shard per call.
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
        exact_slice_init: bool | None = None,
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
        self.pad_size = _pad_size(name, pad, sharded_size, world, 1, what)
        per_rank = divide(sharded_size + self.pad_size, world, what=f"{name} {what}")
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
        self.vocab_size = num_embeddings
        self.num_embeddings = num_embeddings + (0 if shard_across_embedding else self.pad_size)
        self.embedding_dim = embedding_dim + (self.pad_size if shard_across_embedding else 0)
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        self.shard_across_embedding, self.pad, self.collect_output = shard_across_embedding, pad, collect_output
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.vocab_start_index = 0 if shard_across_embedding else rank * per_rank
        self.vocab_end_index = num_embeddings if shard_across_embedding else (rank + 1) * per_rank
        device = _layer_device(device)
        exact = _use_exact_slice_init(name, exact_slice_init, False, device, world)

        def initialize(table, padding_row):
            init_method(table)
            if padding_row is not None:
                table[padding_row].fill_(0)

        layout = _ShardLayout(
            (num_embeddings, embedding_dim), 1 if shard_across_embedding else 0, 1, sharded_size + self.pad_size, rank, world
        )
        self.weight, _ = _sharded_parameter(
            name, layout, partial(initialize, padding_row=self.padding_idx),
            partial(initialize, padding_row=self.padding_idx if shard_across_embedding else self._local_padding_idx()),
            dtype, device, exact,
        )

    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is None or not self.vocab_start_index <= self.padding_idx < self.vocab_end_index:
            return None
        return self.padding_idx - self.vocab_start_index

    def _check_ids(self, input_: torch.Tensor) -> None:
        if input_.dtype == torch.bool or input_.is_floating_point() or input_.is_complex():
            raise InputShapeError(f"ParallelEmbedding expects integer token ids, got {input_.dtype}.")
        message = f"ParallelEmbedding got token ids outside [0, {self.vocab_size})"
        in_range = ((input_ >= 0) & (input_ < self.vocab_size)).all()
        if torch.compiler.is_compiling():
            torch._assert_async(in_range, message)
            return
        try:
            torch._assert_async(in_range, message)  # raises at once on CPU only
        except RuntimeError:
            low, high = torch.aminmax(input_)  # the error path: reading the ids back costs nothing here
            raise InputShapeError(f"{message}; found ids from {int(low)} to {int(high)}.") from None

    def _renorm_looked_up_rows(self, local_ids: torch.Tensor, outside: torch.Tensor) -> None:
        """torch.embedding_renorm_ of the rows that in-range ids look up, without reading the ids on the host."""
        with torch.no_grad():
            hits = torch.zeros(self.weight.shape[0], dtype=torch.int32, device=self.weight.device)
            hits.index_add_(0, local_ids.reshape(-1), (~outside).reshape(-1).to(torch.int32))
            norms = torch.linalg.vector_norm(self.weight, self.norm_type, dim=1)
            too_long = (hits > 0) & (norms > self.max_norm)
            scale = torch.where(too_long, self.max_norm / (norms + 1e-7), torch.ones_like(norms))
            self.weight.mul_(scale.unsqueeze(1))

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
            if self.pad_size:
                output = output.narrow(-1, 0, self.embedding_dim - self.pad_size)
            if self.sequence_parallel_enabled:
                output = scatter_to_sequence_parallel_region(output, self.sequence_dimension, group)
            return output
        if dist.get_world_size(group) == 1:
            output = self._lookup(input_, self.max_norm)
        else:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
            if self.max_norm is not None:
                self._renorm_looked_up_rows(local_ids, outside)
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
        partition_dim, dtype, device, init_method, keep_master_weight, tensor_model_parallel_group, exact_slice_init,
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
        device = _layer_device(device)
        exact = _use_exact_slice_init(name, exact_slice_init, keep_master_weight, device, world)

        full_shape = (out_channels, in_channels, *self.kernel_size)
        fan_in_uniform = partial(linear_bias_init, fan_in=in_channels * self.kernel_size[0] * self.kernel_size[1])
        layout = _ShardLayout(full_shape, partition_dim, 1, full_shape[partition_dim], rank, world)
        self.weight, master = _sharded_parameter(
            name, layout, init_method or linear_weight_init, init_method or fan_in_uniform, dtype, device, exact
        )
        self.master_weight = master if keep_master_weight else None
        self.master_bias = None
        if bias and partition_dim == 0:
            bias_layout = _ShardLayout((out_channels,), 0, 1, out_channels, rank, world)
            self.bias, full_bias = _sharded_parameter(name, bias_layout, fan_in_uniform, fan_in_uniform, dtype, device, exact)
            self.master_bias = full_bias if keep_master_weight else None
        elif bias:
            self.bias = _replicated_parameter((out_channels,), fan_in_uniform, dtype, device, world)
            self.master_bias = self.bias.detach().clone() if keep_master_weight else None
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
        *,
        exact_slice_init: bool | None = None,
    ):
        super().__init__(
            "OutputChannelParallelConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, 0, dtype, device, init_method, keep_master_weight, tensor_model_parallel_group,
            exact_slice_init,
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
        *,
        exact_slice_init: bool | None = None,
    ):
        super().__init__(
            "InputChannelParallelConv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, 1, dtype, device, init_method, keep_master_weight, tensor_model_parallel_group,
            exact_slice_init,
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

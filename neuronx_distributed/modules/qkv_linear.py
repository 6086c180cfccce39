"""Column-parallel QKV projections for grouped-query attention, with KV heads replicated across TP ranks.

With fewer KV heads than TP ranks, `kv_size_multiplier=m` stores each KV head m times
in a row and splits those replicated heads contiguously across the TP group, so that
every rank holds the KV heads its (contiguous) query heads use. Each copy is a
parameter of its own: the backward pass gives every copy the sum of the gradients of
all copies of its head (over the TP group), so the copies stay equal under any
optimizer and training equals the unreplicated model (one all-reduce over the TP
group per backward, of each replicated head's rows once). Input gradients need no
correction: each copy feeds other query heads, so each rank's contribution is genuine.

Each parameter declares its layout (`resharding.Part`, attribute `partition_parts`)
and a `weight_loader`, so checkpoints record the replication (merge writes each head
once, resharding maps heads through the logical tensor), `load(..., sharded=False)`
fills the shards from a full checkpoint tensor, and `grads.get_grad_norm` counts each
head once.

Building blocks: `ReplicatedKVColumnParallelLinear` (one projection, a drop-in for
Hugging Face's `k_proj` / `v_proj`) and `GQAQKVColumnParallelLinear` (upstream's
fused or separate Q, K, V layer).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..errors import LayerConfigError
from ..parallel_layers.initialization import initialized_master, linear_bias_init, linear_weight_init
from ..parallel_layers.layers import (
    BaseParallelLinear,
    _check_last_dim,
    _check_sizes,
    _resolve_group,
    _sequence_dimension,
)
from ..parallel_layers.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from ..parallel_layers.resharding import (
    Part,
    first_copies,
    local_logical_rows,
    local_rows,
    parts_weight_loader,
    set_partition_parts,
)
from ..parallel_layers.utils import set_tensor_model_parallel_attributes
from ..parallel_layers.weight_loading import set_checkpoint_parts, set_weight_loader


def check_kv_replication(layer: str, num_kv_heads: int, kv_size_multiplier: int, world: int, unit: str = "heads") -> None:
    """Raise LayerConfigError unless `num_kv_heads * kv_size_multiplier` heads (or rows) split evenly across `world` ranks."""
    if (num_kv_heads * kv_size_multiplier) % world:
        fit = world // math.gcd(num_kv_heads, world)
        raise LayerConfigError(
            f"{layer}: {num_kv_heads} KV {unit} x kv_size_multiplier={kv_size_multiplier} = "
            f"{num_kv_heads * kv_size_multiplier} replicated {unit} do not split across the tensor parallel size "
            f"{world}; pass kv_size_multiplier={fit} (or a multiple of it), or use a TP degree that divides "
            f"{num_kv_heads * kv_size_multiplier}."
        )


def kv_part(num_kv_heads: int, head_dim: int, kv_size_multiplier: int) -> Part:
    """The layout of a KV projection's rows: each head of `head_dim` rows stored `kv_size_multiplier` times in a row."""
    return Part(num_kv_heads * head_dim * kv_size_multiplier, kv_size_multiplier, head_dim)


class _SumCopies(torch.autograd.Function):
    """Identity forward; backward: each stored copy of a row gets the sum of the gradients of all its copies.

    `local` are the tied rows of this rank's tensor, `logical` the logical row each holds
    (in a buffer of `size` rows); the sum runs over the rank's own copies and the TP group.
    """

    @staticmethod
    def forward(ctx, tensor, local, logical, size, group):
        ctx.local, ctx.logical, ctx.size, ctx.group = local, logical, size, group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        total = grad.new_zeros((ctx.size, *grad.shape[1:]))
        total.index_add_(0, ctx.logical, grad.index_select(0, ctx.local))
        if dist.get_world_size(ctx.group) > 1:
            total = comm.all_reduce(total, group=ctx.group)
        return grad.index_copy(0, ctx.local, total.index_select(0, ctx.logical)), None, None, None, None


class _CopyTie:
    """Ties the replicated rows of one parameter: which local rows are copies of which logical row."""

    def __init__(self, parts, rank: int, world: int, group):
        stored = local_rows(parts, rank, world)
        replicated_rows = torch.cat([
            torch.full((part.size,), part.replication > 1, dtype=torch.bool) for part in parts
        ])[stored]
        self._local = torch.nonzero(replicated_rows).flatten()
        # The summing buffer holds the logical rows of the replicated parts only, numbered alike on every rank.
        in_buffer = torch.cat([torch.full((part.logical_size,), part.replication > 1) for part in parts])
        self._logical = (torch.cumsum(in_buffer, 0) - 1)[local_logical_rows(parts, rank, world)[self._local]]
        self._size = int(in_buffer.sum())
        self._group = group
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def active(self) -> bool:
        return self._local.numel() > 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.active or not torch.is_grad_enabled() or not tensor.requires_grad:
            return tensor
        if tensor.device not in self._on_device:  # moved once per device, not per step
            self._on_device[tensor.device] = (self._local.to(tensor.device), self._logical.to(tensor.device))
        local, logical = self._on_device[tensor.device]
        return _SumCopies.apply(tensor, local, logical, self._size, self._group)


def _declare(param: nn.Parameter, parts, rank: int, world: int) -> nn.Parameter:
    """Mark `param` as a shard made of `parts` and give it the loader that cuts it from a full tensor."""
    set_tensor_model_parallel_attributes(param, True, 0, 1, world)
    set_partition_parts(param, parts)
    set_weight_loader(param, parts_weight_loader(parts, rank, world))
    return param


def _sharded_parameter(masters, parts, rank: int, world: int) -> nn.Parameter:
    """This rank's rows of `parts`, the i-th part cut from the logical tensor `masters[i]`."""
    local = [
        master.index_select(0, local_logical_rows((part,), rank, world).to(master.device))
        for master, part in zip(masters, parts)
    ]
    return _declare(nn.Parameter(torch.cat(local) if len(local) > 1 else local[0]), parts, rank, world)


def _replicated_parameter(tensor: torch.Tensor, world: int) -> nn.Parameter:
    param = nn.Parameter(tensor)
    set_tensor_model_parallel_attributes(param, False, 0, 1, world)
    return param


def _parallel_input(input_, sequence_parallel_enabled, sequence_dimension, group, reduce_dtype):
    if sequence_parallel_enabled:
        return gather_from_sequence_parallel_region(input_, True, sequence_dimension, group, reduce_dtype=reduce_dtype)
    return copy_to_tensor_model_parallel_region(input_, group, reduce_dtype=reduce_dtype)


class ReplicatedKVColumnParallelLinear(BaseParallelLinear):
    """Hugging Face's `k_proj` / `v_proj` (`nn.Linear(input_size, num_kv_heads * head_dim)`) sharded over TP by heads.

    Each KV head is stored `kv_size_multiplier` times in a row and the replicated heads
    are split contiguously across the TP ranks: rank r holds, and returns, the heads its
    contiguous share of the query heads uses (not gathered). Needs
    `(num_kv_heads * kv_size_multiplier) % tp_size == 0`. Parameters `weight`
    `[local_heads * head_dim, input_size]` and `bias`, as `nn.Linear`, so a Hugging Face
    state dict's `...k_proj.weight` matches; built from the same seed, the logical weight
    equals the TP=1 layer's. `sequence_parallel_enabled`: the input is this rank's chunk
    of `sequence_dimension`, all-gathered forward (gradient reduce-scattered backward).
    `keep_master_weight` keeps the full logical initial weight as `master_weight`.
    """

    def __init__(
        self,
        input_size: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool = True,
        kv_size_multiplier: int = 1,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int = 0,
        dtype: torch.dtype = torch.float32,
        device=None,
        init_method=None,
        keep_master_weight: bool = False,
        *,
        tensor_model_parallel_group=None,
        reduce_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        name = "ReplicatedKVColumnParallelLinear"
        _check_sizes(name, input_size=input_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     kv_size_multiplier=kv_size_multiplier)
        self.tensor_parallel_group = _resolve_group(name, tensor_model_parallel_group, None)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        check_kv_replication(name, num_kv_heads, kv_size_multiplier, world)
        self.input_size, self.num_kv_heads, self.head_dim = input_size, num_kv_heads, head_dim
        self.kv_size_multiplier = kv_size_multiplier
        self.num_local_heads = num_kv_heads * kv_size_multiplier // world
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.reduce_dtype = reduce_dtype
        parts = (kv_part(num_kv_heads, head_dim, kv_size_multiplier),)
        output_size = num_kv_heads * head_dim
        master = initialized_master((output_size, input_size), init_method or linear_weight_init, dtype, device)
        self.weight = _sharded_parameter([master], parts, rank, world)
        self.master_weight = master if keep_master_weight else None
        if bias:
            full_bias = initialized_master((output_size,), partial(linear_bias_init, fan_in=input_size), dtype, device)
            self.bias = _sharded_parameter([full_bias], parts, rank, world)
        else:
            self.register_parameter("bias", None)
        self._tie = _CopyTie(parts, rank, world, self.tensor_parallel_group)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_kv_heads: int, head_dim: int, kv_size_multiplier: int = 1,
                    sequence_parallel_enabled: bool = False) -> ReplicatedKVColumnParallelLinear:
        """The layer holding this rank's heads of `linear`'s weights (on the meta device: only the shapes)."""
        if not isinstance(linear, nn.Linear):
            raise LayerConfigError(f"from_linear takes a torch.nn.Linear, got {type(linear).__name__}.")
        if linear.out_features != num_kv_heads * head_dim:
            raise LayerConfigError(
                f"from_linear: the Linear has {linear.out_features} output features, not num_kv_heads * head_dim = "
                f"{num_kv_heads} * {head_dim}; pass the head counts of the projection being replaced."
            )
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features, num_kv_heads, head_dim, bias=linear.bias is not None,
            kv_size_multiplier=kv_size_multiplier, sequence_parallel_enabled=sequence_parallel_enabled,
            dtype=weight.dtype, device=weight.device, init_method=lambda master: master.copy_(weight),
        )
        if linear.bias is not None and weight.device.type != "meta":
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach().index_select(0, layer._logical_rows().to(weight.device)))
        return layer

    def _logical_rows(self) -> torch.Tensor:
        world = dist.get_world_size(self.tensor_parallel_group)
        return local_logical_rows(self.parameter_layouts()["weight"].parts, dist.get_rank(self.tensor_parallel_group), world)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        _check_last_dim(type(self).__name__, input_, self.input_size, "pass the full (unsharded) features to this layer.")
        input_parallel = _parallel_input(
            input_, self.sequence_parallel_enabled, self.sequence_dimension, self.tensor_parallel_group, self.reduce_dtype
        )
        bias = self._tie(self.bias) if self.bias is not None else None
        return F.linear(input_parallel, self._tie(self.weight), bias)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"kv_size_multiplier={self.kv_size_multiplier} ({self.num_local_heads} heads per rank), "
            f"bias={self.bias is not None}, sequence_parallel_enabled={self.sequence_parallel_enabled}"
        )


def _kv_block(layer: str, q_size: int, kv_size: int, num_attention_heads, num_key_value_heads, head_dim) -> int:
    """Rows per replicated KV block: one head when the head size is known, else the whole KV projection (upstream)."""
    if head_dim is None and num_key_value_heads is not None:
        _check_sizes(layer, num_key_value_heads=num_key_value_heads)
        if kv_size % num_key_value_heads:
            raise LayerConfigError(
                f"{layer}: the KV size {kv_size} is not num_key_value_heads={num_key_value_heads} whole heads; "
                "pass output_sizes=[num_heads * head_dim, num_kv_heads * head_dim]."
            )
        head_dim = kv_size // num_key_value_heads
    if head_dim is None and num_attention_heads is not None:
        _check_sizes(layer, num_attention_heads=num_attention_heads)
        if q_size % num_attention_heads:
            raise LayerConfigError(f"{layer}: the Q size {q_size} is not num_attention_heads={num_attention_heads} whole heads.")
        head_dim = q_size // num_attention_heads
    if head_dim is None:
        return kv_size
    _check_sizes(layer, head_dim=head_dim)
    if kv_size % head_dim:
        raise LayerConfigError(f"{layer}: the KV size {kv_size} is not a whole number of heads of head_dim={head_dim}.")
    return head_dim


class GQAQKVColumnParallelLinear(BaseParallelLinear):
    """Upstream's Q, K, V projection for grouped-query attention: `q, k, v = layer(x)`.

    `output_sizes=[q_size, kv_size]`; Q is sharded across the TP group like a
    ColumnParallelLinear, K and V by replicated blocks (see the module docstring) with
    `kv_size_multiplier` copies each, which must fit: `kv_size * kv_size_multiplier`
    split into whole blocks per rank. A block is one KV head when the head size is
    known (`num_key_value_heads`, `head_dim` or `num_attention_heads`, our additions):
    rank r then holds the KV heads its contiguous query heads use in Hugging Face's
    grouping. Without them it is the whole KV projection, upstream's layout (rank r holds
    rows r*s .. of the projection repeated m times). `fuse_qkv=True` keeps one parameter
    `weight_qkv` (this rank's Q, K, V rows, concatenated) and `bias_qkv`; otherwise
    `weight_q/k/v` and `bias_q/k/v`. With `gather_output=True` every rank gets the full
    q, k, v, each KV head once (as the unreplicated layer; upstream returns the copies),
    and the biases are full and replicated; otherwise this rank's rows. Built from the
    same seed, the layer computes what the TP=1 layer with `kv_size_multiplier=1`
    computes, for any TP degree and multiplier.

    Upstream arguments: `sequence_parallel_enabled` / `sequence_dimension` (input is this
    rank's chunk of the sequence; needs gather_output=False), `keep_master_weight` (the
    full initial weights as `master_weight_q/k/v`, or `master_weight_qkv` when fused),
    `reduce_dtype` (dtype of the input-gradient all-reduce), `tensor_model_parallel_group`.
    `layer_name` is recorded only. Unlike upstream, `kv_size_multiplier` needs no separate
    KV process group and need not divide the TP size, and bad sizes raise
    LayerConfigError instead of failing an assert.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        init_method=None,
        sequence_parallel_enabled: bool = False,
        keep_master_weight: bool = False,
        kv_size_multiplier: int = 1,
        fuse_qkv: bool = True,
        reduce_dtype: torch.dtype = torch.float32,
        *,
        sequence_dimension: int | None = None,
        tensor_model_parallel_group=None,
        layer_name: str | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
    ):
        super().__init__()
        name = "GQAQKVColumnParallelLinear"
        if not isinstance(output_sizes, (list, tuple)) or len(output_sizes) != 2:
            raise LayerConfigError(f"{name} output_sizes must be [q_size, kv_size], got {output_sizes!r}.")
        q_size, kv_size = output_sizes
        _check_sizes(name, input_size=input_size, q_size=q_size, kv_size=kv_size, kv_size_multiplier=kv_size_multiplier)
        if sequence_parallel_enabled and gather_output:
            raise LayerConfigError(
                f"{name}(sequence_parallel_enabled=True) needs gather_output=False: q, k, v stay sharded by heads."
            )
        self.tensor_parallel_group = _resolve_group(name, tensor_model_parallel_group, None)
        world, rank = dist.get_world_size(self.tensor_parallel_group), dist.get_rank(self.tensor_parallel_group)
        if q_size % world:
            raise LayerConfigError(
                f"{name}: the Q size {q_size} does not split across the tensor parallel size {world}; use a TP "
                f"degree that divides the number of query heads."
            )
        block = _kv_block(name, q_size, kv_size, num_attention_heads, num_key_value_heads, head_dim)
        if block == kv_size and head_dim is None and num_key_value_heads is None and num_attention_heads is None:
            # upstream's layout: the replicated projection is split by rows
            check_kv_replication(name, kv_size, kv_size_multiplier, world, "rows (pass num_key_value_heads to count heads)")
        else:
            check_kv_replication(name, kv_size // block, kv_size_multiplier, world)
        self.input_size, self.output_sizes = input_size, [q_size, kv_size]
        self.gather_output, self.fuse_qkv, self.kv_size_multiplier = gather_output, fuse_qkv, kv_size_multiplier
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.sequence_dimension = _sequence_dimension(sequence_dimension)
        self.reduce_dtype, self.layer_name, self.dtype, self.arg_init_method = reduce_dtype, layer_name, dtype, init_method
        self.use_bias, self.keep_master_weight = bias, keep_master_weight
        self.q_output_size_per_partition = q_size // world
        self.kv_output_size_per_partition = kv_size * kv_size_multiplier // world
        self._kv_part = Part(kv_size * kv_size_multiplier, kv_size_multiplier, block)
        parts = {"q": Part(q_size), "k": self._kv_part, "v": self._kv_part}
        sizes = {"q": q_size, "k": kv_size, "v": kv_size}
        # Parameter suffix -> the projections it holds, concatenated.
        self._members = {"qkv": ("q", "k", "v")} if fuse_qkv else {key: (key,) for key in ("q", "k", "v")}
        self._ties: dict[str, _CopyTie] = {}

        init = init_method or linear_weight_init
        masters = {key: initialized_master((size, input_size), init, dtype, device) for key, size in sizes.items()}
        self._add_parameters("weight", masters, parts, True, rank, world)
        if bias:
            bias_init = partial(linear_bias_init, fan_in=input_size)
            full_biases = {key: initialized_master((size,), bias_init, dtype, device) for key, size in sizes.items()}
            self._add_parameters("bias", full_biases, parts, not gather_output, rank, world)
        else:
            for key in self._members:
                self.register_parameter(f"bias_{key}", None)
        for key in ("q", "k", "v", "qkv"):
            members = self._members.get(key)
            kept = torch.cat([masters[member] for member in members]) if keep_master_weight and members else None
            setattr(self, f"master_weight_{key}", kept)
        self._gathered_kv = first_copies((self._kv_part,))

    def _add_parameters(self, kind: str, full: dict, parts: dict, sharded: bool, rank: int, world: int) -> None:
        """`kind`_q/k/v (or `kind`_qkv when fused) from the full tensors `full`: this rank's rows when `sharded`, else whole."""
        for key, members in self._members.items():
            tensors = [full[member] for member in members]
            if sharded:
                member_parts = tuple(parts[member] for member in members)
                param = _sharded_parameter(tensors, member_parts, rank, world)
                self._ties[f"{kind}_{key}"] = _CopyTie(member_parts, rank, world, self.tensor_parallel_group)
            else:
                param = _replicated_parameter(torch.cat(tensors), world)
            if len(members) > 1:  # checkpoints (ours unfused, Hugging Face style) often hold it as q, k, v
                set_checkpoint_parts(param, [f"{kind}_{member}" for member in members])
            setattr(self, f"{kind}_{key}", param)

    def _param(self, name: str):
        param = getattr(self, name)
        tie = self._ties.get(name)
        return tie(param) if tie is not None and param is not None else param

    def _dereplicated(self, gathered: torch.Tensor) -> torch.Tensor:
        """Gathered K or V columns (every copy, in rank order) with each logical column once."""
        if self.kv_size_multiplier == 1:
            return gathered
        index = self._gathered_kv
        if index.device != gathered.device:
            index = self._gathered_kv = index.to(gathered.device)
        return gathered.index_select(-1, index)

    def forward(self, input_: torch.Tensor):
        _check_last_dim(type(self).__name__, input_, self.input_size, "pass the full (unsharded) features to this layer.")
        group = self.tensor_parallel_group
        x = _parallel_input(input_, self.sequence_parallel_enabled, self.sequence_dimension, group, self.reduce_dtype)
        local_bias = not self.gather_output
        if self.fuse_qkv:
            bias = self._param("bias_qkv") if local_bias else None
            local_sizes = [self.q_output_size_per_partition] + [self.kv_output_size_per_partition] * 2
            q, k, v = F.linear(x, self._param("weight_qkv"), bias).split(local_sizes, dim=-1)
        else:
            q, k, v = (
                F.linear(x, self._param(f"weight_{key}"), self._param(f"bias_{key}") if local_bias else None)
                for key in ("q", "k", "v")
            )
        if not self.gather_output:
            return q, k, v
        q = gather_from_tensor_model_parallel_region(q, group)
        k = self._dereplicated(gather_from_tensor_model_parallel_region(k, group))
        v = self._dereplicated(gather_from_tensor_model_parallel_region(v, group))
        if self.use_bias:
            q_size, kv_size = self.output_sizes
            if self.fuse_qkv:
                bias_q, bias_k, bias_v = self.bias_qkv.split([q_size, kv_size, kv_size])
            else:
                bias_q, bias_k, bias_v = self.bias_q, self.bias_k, self.bias_v
            q, k, v = q + bias_q, k + bias_k, v + bias_v
        return q, k, v

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_sizes={self.output_sizes}, kv_size_multiplier={self.kv_size_multiplier}, "
            f"fuse_qkv={self.fuse_qkv}, bias={self.use_bias}, gather_output={self.gather_output}, "
            f"sequence_parallel_enabled={self.sequence_parallel_enabled}"
        )

"""Building the parallel layers from the checked plan, and materializing a meta-device model."""

from __future__ import annotations

import torch
from torch import nn

from ..modules.qkv_linear import ReplicatedKVColumnParallelLinear
from ..parallel_layers.initialization import shard_of
from ..parallel_layers.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from ..parallel_layers.utils import set_tensor_model_parallel_attributes
from .checks import Swap
from .conv1d import ColumnParallelConv1D, RowParallelConv1D
from .sequence_parallel import SEQUENCE_DIMENSION


class Shards:
    """The new parameters, one per original parameter (so tied weights stay tied)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self._made = rank, world, {}

    def get(self, param: nn.Parameter | None, layout) -> nn.Parameter | None:
        if param is None:
            return None
        if id(param) not in self._made:
            if layout is None:
                new = param
                set_tensor_model_parallel_attributes(new, False, 0, 1, self.world)
            else:
                dim, stride = layout
                if param.is_meta:
                    shape = list(param.shape)
                    shape[dim] //= self.world
                    data = torch.empty(shape, dtype=param.dtype, device="meta")
                else:
                    data = shard_of(param.detach(), dim, stride, self.rank, self.world)
                new = nn.Parameter(data, requires_grad=param.requires_grad)
                set_tensor_model_parallel_attributes(new, True, dim, stride, self.world)
            self._made[id(param)] = new
        return self._made[id(param)]


def build(swap: Swap, shards: Shards, group) -> nn.Module:
    style, module = swap.style, swap.module
    if swap.kv_multiplier > 1:  # a key/value projection: never sequence-parallel (see tp_plan.sequence_parallel)
        layer = ReplicatedKVColumnParallelLinear.from_linear(
            module, module.out_features // swap.head_dim, swap.head_dim, kv_size_multiplier=swap.kv_multiplier
        )
        return layer.train(module.training)
    sequence = dict(sequence_parallel_enabled=swap.sequence_parallel, sequence_dimension=SEQUENCE_DIMENSION)
    if style.kind == "embedding":
        layer = ParallelEmbedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, module.max_norm, module.norm_type,
            module.scale_grad_by_freq, module.sparse, device="meta", dtype=module.weight.dtype,
            shard_across_embedding=style.shard_across_embedding, tensor_model_parallel_group=group,
        )
    elif isinstance(module, nn.Linear):
        common = dict(bias=module.bias is not None, dtype=module.weight.dtype, device="meta",
                      tensor_model_parallel_group=group, **sequence)
        if style.kind == "column":
            layer = ColumnParallelLinear(module.in_features, module.out_features, gather_output=style.gather_output,
                                         stride=style.blocks, **common)
        else:
            layer = RowParallelLinear(module.in_features, module.out_features,
                                      input_is_parallel=style.input_is_parallel, **common)
    elif style.kind == "column":
        layer = ColumnParallelConv1D(module, style.gather_output, style.blocks, group)
    else:
        layer = RowParallelConv1D(module, style.input_is_parallel, group)
    for name, layout in swap.layouts.items():
        setattr(layer, name, shards.get(getattr(module, name), layout))
    layer.train(module.training)
    return layer


def materialize(model: nn.Module, device) -> None:
    """Meta parameters and buffers -> empty tensors on `device`; non-persistent buffers recomputed by the model."""
    made, recompute = {}, []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                    new.__dict__.update(param.__dict__)  # its sharding attributes and weight_loader
                    made[id(param)] = new
                module._parameters[name] = made[id(param)]
        meta_buffers = [name for name, buffer in module._buffers.items() if buffer is not None and buffer.is_meta]
        for name in meta_buffers:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        if meta_buffers:
            recompute.append(module)
    init_weights = getattr(model, "_init_weights", None)
    if init_weights is not None:
        with torch.no_grad():
            for module in recompute:
                init_weights(module)

"""Tensor- and sequence-parallel layers, their process-group state, gradient utilities and checkpoints.

Exports the seed's names and those of upstream NxD 2.x's `parallel_layers` package.
"""

from . import grads, layer_norm, layers, loss_functions, mappings, pad, parallel_state, random, utils
from .checkpointing import load, save
from .grads import all_reduce_gradients, allreduce_sequence_parallel_gradients, clip_grad_norm, optimizer_step
from .layers import (
    ColumnParallelLinear,
    InputChannelParallelConv2d,
    OutputChannelParallelConv2d,
    ParallelEmbedding,
    RowParallelLinear,
)
from .loss_functions import parallel_cross_entropy
from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .parallel_state import initialize_model_parallel
from .random import get_xla_rng_tracker, model_parallel_xla_manual_seed
from .utils import (
    copy_tensor_model_parallel_attributes,
    move_model_to_device,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
    split_tensor_along_last_dim,
)

__all__ = [
    "ColumnParallelLinear",
    "InputChannelParallelConv2d",
    "OutputChannelParallelConv2d",
    "ParallelEmbedding",
    "RowParallelLinear",
    "all_reduce_gradients",
    "allreduce_sequence_parallel_gradients",
    "clip_grad_norm",
    "copy_tensor_model_parallel_attributes",
    "copy_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "get_xla_rng_tracker",
    "grads",
    "initialize_model_parallel",
    "layer_norm",
    "layers",
    "load",
    "loss_functions",
    "mappings",
    "model_parallel_xla_manual_seed",
    "move_model_to_device",
    "optimizer_step",
    "pad",
    "parallel_cross_entropy",
    "parallel_state",
    "random",
    "reduce_from_tensor_model_parallel_region",
    "save",
    "scatter_to_tensor_model_parallel_region",
    "set_defaults_if_not_set_tensor_model_parallel_attributes",
    "set_tensor_model_parallel_attributes",
    "split_tensor_along_last_dim",
    "utils",
]

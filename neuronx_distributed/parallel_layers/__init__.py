"""Tensor-parallel layers, their process-group state, gradient utilities and checkpoints."""

from . import layers, parallel_state
from .checkpointing import load, save
from .device import move_model_to_device
from .grads import all_reduce_gradients, clip_grad_norm, optimizer_step
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

__all__ = [
    "ColumnParallelLinear",
    "ParallelEmbedding",
    "RowParallelLinear",
    "all_reduce_gradients",
    "clip_grad_norm",
    "layers",
    "load",
    "move_model_to_device",
    "optimizer_step",
    "parallel_state",
    "save",
]

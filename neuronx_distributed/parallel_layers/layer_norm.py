"""torch.nn.LayerNorm that marks its parameters for sequence parallelism (upstream's `parallel_layers.layer_norm`)."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm whose weight and bias carry `sequence_parallel_enabled`.

    In a sequence-parallel region each TP rank normalizes its chunk of the sequence with
    the same (replicated) weight and bias, so their gradients cover that chunk only; with
    `sequence_parallel_enabled=True` `grads.allreduce_sequence_parallel_gradients` sums
    them over the TP group. The forward is torch's own (upstream's XLA_DOWNCAST_BF16
    up-cast is a Neuron-only switch and is not read here).
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        sequence_parallel_enabled: bool = False,
        bias: bool = True,
    ):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)
        self.sequence_parallel_enabled = sequence_parallel_enabled
        for param in (self.weight, self.bias):
            if isinstance(param, torch.Tensor):
                param.sequence_parallel_enabled = sequence_parallel_enabled

"""Optimizers for data-parallel training: ZeRO-1 (`NeuronZero1Optimizer`), as upstream NxD names it."""

from .zero_redundancy_optimizer import NeuronZero1Optimizer

__all__ = ["NeuronZero1Optimizer"]

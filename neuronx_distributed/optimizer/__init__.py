"""Optimizers for data-parallel training: ZeRO-1 (`NeuronZero1Optimizer`), as upstream NxD names it, and sharded optimizer checkpoints."""

from .checkpoint import load_optimizer_state, save_optimizer_state
from .zero_redundancy_optimizer import NeuronZero1Optimizer

__all__ = ["NeuronZero1Optimizer", "load_optimizer_state", "save_optimizer_state"]

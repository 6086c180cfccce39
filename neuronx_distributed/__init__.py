"""Tensor and data parallelism for PyTorch with the NeuronxDistributed API, on any torch.distributed backend."""

from . import parallel_layers, trace
from .parallel_layers import parallel_state

__all__ = ["parallel_layers", "parallel_state", "trace"]
__version__ = "0.1.0"

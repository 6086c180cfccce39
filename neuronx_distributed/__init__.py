"""Tensor and data parallelism for PyTorch with the NeuronxDistributed API, on any torch.distributed backend."""

import sys

from . import modules, optimizer, parallel_layers, trace, utils
from .parallel_layers import parallel_state
from .tp_plan import parallelize

# The seed spells it both ways; `import neuronx_distributed.parallel_state` must give the same module object.
sys.modules[f"{__name__}.parallel_state"] = parallel_state

__all__ = ["modules", "optimizer", "parallel_layers", "parallel_state", "parallelize", "trace", "utils"]
__version__ = "0.1.0"

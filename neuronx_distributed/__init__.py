"""Tensor and data parallelism for PyTorch with the NeuronxDistributed API, on any torch.distributed backend."""

import sys

from . import modules, optimizer, parallel_layers, trace, trainer, utils
from .parallel_layers import parallel_state
from .tp_plan import parallelize
from .trainer import (
    finalize_checkpoint,
    has_checkpoint,
    initialize_parallel_model,
    initialize_parallel_optimizer,
    load_checkpoint,
    neuronx_distributed_config,
    save_checkpoint,
)

# The seed spells it both ways; `import neuronx_distributed.parallel_state` must give the same module object.
sys.modules[f"{__name__}.parallel_state"] = parallel_state

__all__ = [
    "finalize_checkpoint",
    "has_checkpoint",
    "initialize_parallel_model",
    "initialize_parallel_optimizer",
    "load_checkpoint",
    "modules",
    "neuronx_distributed_config",
    "optimizer",
    "parallel_layers",
    "parallel_state",
    "parallelize",
    "save_checkpoint",
    "trace",
    "trainer",
    "utils",
]
__version__ = "0.1.0"

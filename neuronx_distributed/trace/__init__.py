"""Traced tensor-parallel inference: trace a model's shards in worker processes, save, load, call.

    model = parallel_model_trace(get_model, example_inputs, tp_degree=2)
    parallel_model_save(model, "tp_models")
    model = parallel_model_load("tp_models")
    outputs = model(*example_inputs)

Each worker is a spawned process (one per TP rank, with its own process group and
parallel_state) that exports its shard with torch.export; the collectives of the
parallel layers are ops of the exported program.
"""

from .api import parallel_model_load, parallel_model_save, parallel_model_trace
from .model import TensorParallelModel

__all__ = ["TensorParallelModel", "parallel_model_load", "parallel_model_save", "parallel_model_trace"]

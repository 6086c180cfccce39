"""Traced tensor-parallel inference: trace a model's shards in worker processes, save, load, call.

    model = parallel_model_trace(get_model, example_inputs, tp_degree=2)
    parallel_model_save(model, "tp_models")
    model = parallel_model_load("tp_models")
    outputs = model(*example_inputs)

Each worker is a spawned process (one per TP rank, with its own process group and
parallel_state) that exports its shard with torch.export; the collectives of the
parallel layers are ops of the exported program.

A saved folder is data, never code: `parallel_model_load` checks the manifest
against its schema and every archive against what `parallel_model_save` writes,
and refuses anything torch would unpickle or execute (UnsafeTracedModelError).
A call that a stopped or stuck worker holds up ends with WorkerTimeoutError
(`call_timeout_s`); a call after `close()` raises TracedModelClosedError.
"""

from .api import parallel_model_load, parallel_model_save, parallel_model_trace
from .model import TensorParallelModel

__all__ = ["TensorParallelModel", "parallel_model_load", "parallel_model_save", "parallel_model_trace"]

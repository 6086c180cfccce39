"""TensorParallelModel: a traced model whose shards run in worker processes, called like the model."""

from __future__ import annotations

import threading
import weakref

import torch

from .artifact import Manifest, RankRecord
from .shared_arena import SharedArena, copy_bytes
from .signature import InputSignature, OutputLayout, rebuild_outputs
from .workers import WorkerGroup


class TensorParallelModel:
    """The traced shards of one model, one per tensor-parallel worker, behind one callable.

    Call it with the inputs it was traced with; it returns tensor-parallel rank 0's
    outputs (tuples, lists and dicts as the model returned them; dict-like output
    classes become dicts). Inputs and outputs pass through shared memory. The workers
    stay alive until `close()`, the end of a `with` block, or garbage collection.
    """

    def __init__(self, workers: WorkerGroup, inputs: InputSignature, outputs: OutputLayout, ranks: list[RankRecord],
                 io_aliases: dict[str, int]):
        self._workers = workers
        self.inputs = inputs
        self.outputs = outputs
        self._ranks = tuple(ranks)
        self._io_aliases = dict(io_aliases)
        self._arena = SharedArena.create(inputs.specs + list(outputs.specs))
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shut_down, workers, self._arena, self._lock)
        workers.share_arena(self._arena, inputs)
        count = len(inputs.specs)
        self._input_tensors = self._arena.tensors[:count]
        self._output_tensors = self._arena.tensors[count:]

    @property
    def tp_degree(self) -> int:
        return self._workers.tp_degree

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers, in tensor-parallel rank order."""
        return self._workers.pids

    @property
    def manifest(self) -> Manifest:
        """What `parallel_model_save` records about this model besides the programs."""
        return Manifest(self.tp_degree, self.inputs, self.outputs, self._ranks, self._io_aliases)

    def __call__(self, *args, **kwargs):
        tensors = self.inputs.flatten(args, kwargs)
        with self._lock:
            # After close() the arena is unmapped: touching its tensors would crash the process.
            self._workers.check_open()
            for destination, tensor in zip(self._input_tensors, tensors):
                copy_bytes(destination, tensor.detach().cpu().contiguous())
            self._workers.step()
            results = [copy_bytes(torch.empty_like(tensor), tensor) for tensor in self._output_tensors]
        return rebuild_outputs(self.outputs.structure, results)

    def command(self, *command) -> list:
        """Run a worker command (see worker_main) on every rank; their replies in rank order."""
        with self._lock:
            return self._workers.command(*command)

    def close(self) -> None:
        """Stop the workers and free the shared memory (after a call in progress). Calling it again does nothing.

        Calls after this raise TracedModelClosedError.
        """
        self._finalizer()

    def __enter__(self) -> TensorParallelModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._workers.closed else f"workers {self.worker_pids}"
        return f"TensorParallelModel(tp_degree={self.tp_degree}, {state})"


def _shut_down(workers: WorkerGroup, arena: SharedArena, lock: threading.Lock) -> None:
    with lock:  # a call in another thread finishes with the arena first
        workers.close()
        arena.close()

"""Typed exceptions raised for bad input; each message says what to do."""


class NeuronxDistributedError(Exception):
    """Base class of every error this library raises on purpose."""


class ModelParallelNotInitializedError(NeuronxDistributedError, RuntimeError):
    """A getter or parallel layer was used before `initialize_model_parallel`."""


class ModelParallelAlreadyInitializedError(NeuronxDistributedError, RuntimeError):
    """`initialize_model_parallel` was called again with a different topology."""


class ParallelSizeError(NeuronxDistributedError, ValueError):
    """A parallel degree or a layer size that does not divide evenly."""


class UnsupportedParallelismError(ParallelSizeError, NotImplementedError):
    """A parallelism that this library does not implement yet (pipeline, context or expert degree above 1)."""


class InputShapeError(NeuronxDistributedError, ValueError):
    """A tensor whose shape does not fit the layer or collective it was given to."""


class LayerConfigError(NeuronxDistributedError, ValueError):
    """Layer arguments that cannot work together, or a layer size that is not a positive integer."""


class LayerFeatureNotSupportedError(NeuronxDistributedError, NotImplementedError):
    """An upstream layer option this library accepts but does not implement for the given sizes (e.g. pad=True)."""


class ParallelizePlanError(NeuronxDistributedError, ValueError):
    """A tensor-parallel plan `parallelize` cannot apply: no plan, an unknown style, or a module the style cannot shard (named)."""


class CollectiveError(NeuronxDistributedError, RuntimeError):
    """A collective that cannot run as asked (unsupported dtype, dead peer, timeout)."""


class CommBackendError(CollectiveError, ValueError):
    """A comm engine setting that cannot work: NXD_COMM_BACKEND/NXD_COMM_TIMEOUT or `comm.set_backend` out of range,
    ranks of one group set up with different engines, or `shm` where the shared-memory engine cannot serve the group."""


class OptimizerConfigError(NeuronxDistributedError, ValueError):
    """Optimizer arguments that cannot work (not an optimizer class, a bad max_norm, sharding groups that are not the DP groups)."""


class OptimizerStateError(NeuronxDistributedError, ValueError):
    """An optimizer state dict that does not belong to this optimizer's partition (other sharding, sizes or groups)."""


class LossInputError(NeuronxDistributedError, ValueError):
    """Inputs a loss function cannot take: targets outside the vocabulary, a label_smoothing outside [0, 1]."""


class RNGStateTrackerError(NeuronxDistributedError, ValueError):
    """An RNG tracker state added twice (same name or seed), or forked or restored without being added."""


class TrainerConfigError(NeuronxDistributedError, ValueError):
    """A trainer config (`neuronx_distributed_config`) with an unknown key, a bad value, or settings that cannot work together."""


class CheckpointError(NeuronxDistributedError):
    """Base class of the errors raised by `parallel_layers.save` and `load` and by `nxd checkpoint`."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or no shard folder, or no file the manifest names) at the given path."""


class IncompleteCheckpointError(CheckpointError, RuntimeError):
    """Shard folders without a manifest: the save that wrote them did not finish."""


class CheckpointCorruptError(CheckpointError, RuntimeError):
    """A file whose checksum or size differs from the manifest, or a manifest that cannot be read."""


class CheckpointKeyError(CheckpointError, ValueError):
    """Keys missing from the checkpoint or the model (named), or a `model_key` that is not there."""


class CheckpointShapeError(CheckpointError, ValueError):
    """A tensor whose checkpoint shape or sharding differs from the model's (both named)."""


class ReshardError(CheckpointError, ValueError):
    """A checkpoint that cannot be loaded at the requested tensor-parallel degree."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """A file that would need unpickling arbitrary code, or a value that our format cannot hold."""


class CheckpointSaveError(CheckpointError, RuntimeError):
    """A rank failed while writing; the checkpoint at the path is the previous one (or none)."""


class CheckpointArgumentError(CheckpointError, ValueError):
    """Arguments to `save` / `load` that cannot work together (e.g. sharded=False without a model)."""


class TracedModelFolderError(CheckpointError, ValueError):
    """A traced-model folder (trace.parallel_model_save) given where a checkpoint of `save` is expected."""


class CheckpointBusyError(CheckpointError, RuntimeError):
    """Another save to the same folder is in progress; the folder keeps what that save leaves."""


class ReplicatedMismatchError(CheckpointError, ValueError):
    """A tensor saved as replicated (no tensor-parallel attributes) that differs across the TP ranks."""


class TraceError(NeuronxDistributedError):
    """Base class of the errors raised by `trace.parallel_model_trace`, `parallel_model_save` and `parallel_model_load`."""


class MissingMainGuardError(TraceError, RuntimeError):
    """The script starts tensor-parallel workers at import time, without `if __name__ == "__main__":`."""


class TraceFunctionError(TraceError, TypeError):
    """A model function or example inputs that the worker processes cannot receive."""


class TracedInputError(TraceError, ValueError):
    """Inputs to a traced model whose number, names, shapes or dtypes differ from the traced ones."""


class TraceWorkerError(TraceError, RuntimeError):
    """A worker raised while building, tracing, loading, saving or running its shard (its traceback included)."""


class WorkerCrashedError(TraceError, RuntimeError):
    """A worker process died; the traced model is closed and its other workers are stopped."""


class TracedModelClosedError(TraceError, RuntimeError):
    """A traced model used after `close()` or after one of its workers failed."""


class TracedModelNotFoundError(TraceError, FileNotFoundError):
    """No traced model (manifest or shard file) at the given path."""


class TracedModelCorruptError(TraceError, RuntimeError):
    """A traced model whose manifest cannot be read or whose shard file differs from the manifest."""


class TracedModelSaveError(TraceError, RuntimeError):
    """A traced model that cannot be saved at the given path; the path keeps what it had."""


class UnsafeTracedModelError(TracedModelCorruptError):
    """A traced model's program archive with content that loading would execute (pickled data, code, a native library)."""


class WorkerTimeoutError(TraceError, TimeoutError):
    """A worker that stopped answering (stopped by a signal, or past the call timeout); the traced model is closed."""

"""Typed exceptions raised for bad input; each message says what to do."""


class NeuronxDistributedError(Exception):
    """Base class of every error this library raises on purpose."""


class ModelParallelNotInitializedError(NeuronxDistributedError, RuntimeError):
    """A getter or parallel layer was used before `initialize_model_parallel`."""


class ModelParallelAlreadyInitializedError(NeuronxDistributedError, RuntimeError):
    """`initialize_model_parallel` was called again with a different topology."""


class ParallelSizeError(NeuronxDistributedError, ValueError):
    """A parallel degree or a layer size that does not divide evenly."""


class InputShapeError(NeuronxDistributedError, ValueError):
    """A tensor whose shape does not fit the layer or collective it was given to."""


class CollectiveError(NeuronxDistributedError, RuntimeError):
    """A collective that cannot run as asked (unsupported dtype, dead peer, timeout)."""


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

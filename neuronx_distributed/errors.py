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

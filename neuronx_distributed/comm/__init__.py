"""Collectives over torch process groups, each run by the engine its group chose.

Every group gets its engines when it is set up (`initialize_model_parallel` for the TP, DP
and world groups, else its first collective): the C++ shared-memory engine for CPU tensors
when every rank of the group is on this host and the compiled extension is built,
torch.distributed (gloo, NCCL) otherwise. `set_backend("auto"|"shm"|"torch", timeout_s)`
forces a choice (NXD_COMM_BACKEND and NXD_COMM_TIMEOUT override it). A collective of the
shared-memory engine fails with CollectiveError when a peer dies, or stalls for longer than
the timeout (default: torch.distributed's default timeout).
"""

from .collectives import (
    CollectiveLog,
    all_gather,
    all_reduce,
    barrier,
    broadcast,
    engine_for,
    record_collectives,
    reduce_scatter,
    set_backend,
    set_default_group,
    set_up,
)
from .groups import GroupEngines
from .native import _C
from .settings import BACKEND_ENV, BACKENDS, TIMEOUT_ENV


def shm_engine_available() -> bool:
    """Whether the compiled shared-memory engine is built (it still runs only for groups it can serve)."""
    return _C is not None


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "TIMEOUT_ENV",
    "CollectiveLog",
    "GroupEngines",
    "all_gather",
    "all_reduce",
    "barrier",
    "broadcast",
    "engine_for",
    "record_collectives",
    "reduce_scatter",
    "set_backend",
    "set_default_group",
    "set_up",
    "shm_engine_available",
]

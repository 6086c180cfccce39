"""Collectives over torch process groups, each run by the fastest engine that can.

The C++ shared-memory engine runs when every rank of the group is on this host and
the tensor is on CPU; torch.distributed (gloo, NCCL) runs otherwise.
`NXD_COMM_BACKEND=auto|shm|torch` forces a choice (default auto).
"""

from .collectives import (
    BACKEND_ENV,
    CollectiveLog,
    all_gather,
    all_reduce,
    backend_choice,
    barrier,
    broadcast,
    engine_for,
    record_collectives,
    reduce_scatter,
    register_shm_engine,
    shm_engine_available,
)

__all__ = [
    "BACKEND_ENV",
    "CollectiveLog",
    "all_gather",
    "all_reduce",
    "backend_choice",
    "barrier",
    "broadcast",
    "engine_for",
    "record_collectives",
    "reduce_scatter",
    "register_shm_engine",
    "shm_engine_available",
]

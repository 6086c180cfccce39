"""Collectives over torch process groups, each run by the fastest engine that can.

The C++ shared-memory engine runs when every rank of the group is on this host and
the tensor is on CPU; torch.distributed (gloo, NCCL) runs otherwise.
`NXD_COMM_BACKEND=auto|shm|torch` forces a choice (default auto). A collective of the
shared-memory engine fails with CollectiveError when a peer dies, or stalls for longer than
NXD_COMM_TIMEOUT seconds (default: torch.distributed's default timeout).
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
from .shm import ShmEngine

register_shm_engine(ShmEngine())

__all__ = [
    "BACKEND_ENV",
    "ShmEngine",
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

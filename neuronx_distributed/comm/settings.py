"""Which engine `comm` uses and how long the shared-memory engine waits for a peer.

`set_backend` sets both for this process; the environment variables NXD_COMM_BACKEND
(auto|shm|torch) and NXD_COMM_TIMEOUT (seconds) override it. They are read when a group's
engines are set up (see `comm.groups`), never at import, so a bad value raises
CommBackendError there, on every rank of the group.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from ..errors import CommBackendError

BACKEND_ENV = "NXD_COMM_BACKEND"
TIMEOUT_ENV = "NXD_COMM_TIMEOUT"
BACKENDS = ("auto", "shm", "torch")

_backend = "auto"
_timeout_s: float | None = None


def check_backend(value, source: str) -> str:
    """`value` as one of BACKENDS (case and spaces ignored); CommBackendError naming `source` otherwise."""
    choice = value.strip().lower() if isinstance(value, str) else value
    if choice not in BACKENDS:
        raise CommBackendError(f"{source}={value!r} is not one of {', '.join(BACKENDS)}; use auto (the default).")
    return choice


def check_timeout(value, source: str) -> float:
    """`value` as a positive number of seconds; CommBackendError naming `source` otherwise."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not seconds > 0:
        raise CommBackendError(f"{source}={value!r} must be a positive number of seconds.")
    return seconds


def store(backend: str, timeout_s: float | None) -> None:
    """Keep this process's choice (checked by the caller, `comm.set_backend`)."""
    global _backend, _timeout_s
    _backend, _timeout_s = backend, timeout_s


def current() -> tuple[str, float]:
    """(backend, timeout in seconds): the environment if set, else `set_backend`'s, else auto and
    torch.distributed's default timeout."""
    text = os.environ.get(BACKEND_ENV, "")
    backend = check_backend(text, BACKEND_ENV) if text.strip() else _backend
    text = os.environ.get(TIMEOUT_ENV, "")
    if text.strip():
        return backend, check_timeout(text.strip(), TIMEOUT_ENV)
    return backend, _timeout_s if _timeout_s is not None else dist.default_pg_timeout.total_seconds()

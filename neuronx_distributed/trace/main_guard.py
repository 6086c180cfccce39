"""Detect the user's script being re-run inside a spawned worker because it lacks the `__main__` guard.

Workers are started with the "spawn" method, which imports the parent's main script in
each worker under the name `__mp_main__`. Code at the top level of that script runs
again there; if it starts workers itself, the worker must stop with a clear message
instead of spawning workers of its own.
"""

from __future__ import annotations

import sys

# The exit status of a worker that stopped for this reason, so the parent can say why.
MISSING_GUARD_EXIT_CODE = 87

_SPAWNED_MAIN = "__mp_main__"


def missing_guard_message(api_name: str) -> str:
    """What the user must change, naming the API that was called at import time."""
    return (
        f"neuronx_distributed.trace.{api_name} was called at the top level of the main script. It starts "
        "worker processes with the 'spawn' method, which re-imports the main script in every worker, so "
        f"the call must sit under the guard:\n\n    if __name__ == \"__main__\":\n        ...{api_name}(...)\n\n"
        "Move the call (and everything that uses the traced model) below that line."
    )


def called_from_spawned_main() -> bool:
    """True when the current call comes from top-level code of a script re-run by spawn."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == _SPAWNED_MAIN:
            return True
        frame = frame.f_back
    return False


def exit_if_spawned_main(api_name: str) -> None:
    """In a worker re-running an unguarded script: explain on stderr and exit with MISSING_GUARD_EXIT_CODE."""
    if called_from_spawned_main():
        print(missing_guard_message(api_name), file=sys.stderr, flush=True)
        raise SystemExit(MISSING_GUARD_EXIT_CODE)

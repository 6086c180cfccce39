"""The messages between a traced model and its workers on each worker's pipe.

A call is one byte each way (`STEP`, then `DONE`); tensors travel through the
shared arena, never through the pipe. Set-up and commands (trace, load, save)
are pickled, as are the replies to them; a failure carries the worker's traceback.
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection

STEP = b"s"  # caller -> worker: run the program on the arena's inputs
DONE = b"d"  # worker -> caller: the step finished (rank 0 wrote the outputs)
COMMAND = b"c"  # caller -> worker: a pickled command follows
REPLY = b"r"  # worker -> caller: a pickled reply follows
FAILED = b"f"  # worker -> caller: the worker's traceback follows; the worker stops


def send_command(conn: Connection, command) -> None:
    conn.send_bytes(COMMAND + pickle.dumps(command))


def send_reply(conn: Connection, reply) -> None:
    conn.send_bytes(REPLY + pickle.dumps(reply))


def send_failure(conn: Connection, error_name: str, traceback_text: str) -> None:
    """Report a failure: the name of the error's class (for the caller to raise the same kind), then the traceback."""
    conn.send_bytes(FAILED + f"{error_name}\n{traceback_text}".encode())


def failure(message: bytes) -> tuple[str, str]:
    """The error class name and the traceback of a FAILED message."""
    name, _, text = message[1:].decode(errors="replace").partition("\n")
    return name, text


def payload(message: bytes):
    """The unpickled body of a COMMAND or REPLY message."""
    return pickle.loads(message[1:])

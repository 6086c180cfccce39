"""The worker process of a traced model: one per tensor-parallel rank.

It joins a process group of `tp_degree` ranks through the caller's TCP store,
initializes parallel_state, runs its job (trace or load), maps the shared arena,
then serves calls until told to close or until the caller goes away.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from ..durable import fsync_path
from ..parallel_layers import parallel_state
from . import protocol
from .artifact import file_sha256, rank_program_file
from .jobs import Shard
from .program_runner import program_runner
from .shared_arena import SharedArena
from .signature import InputSignature

STORE_TIMEOUT = timedelta(minutes=5)


def worker_main(rank: int, tp_degree: int, store_port: int, conn: Connection, threads: int) -> None:
    """Entry point of a spawned worker."""
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=STORE_TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=tp_degree)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_degree)
        job = protocol.payload(conn.recv_bytes())
        shard = job.run()
        protocol.send_reply(conn, (shard.outputs, shard.collectives, shard.groups, shard.io_aliases))
        _serve(rank, conn, shard)
    except EOFError:
        pass  # the caller is gone: nothing to report to
    except BaseException as error:  # noqa: BLE001 - reported to the caller, which stops every worker
        try:
            protocol.send_failure(conn, type(error).__name__, traceback.format_exc())
        except OSError:
            pass
    finally:
        if dist.is_initialized():
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def _serve(rank: int, conn: Connection, shard: Shard) -> None:
    signature: InputSignature = protocol.payload(conn.recv_bytes())
    arena = SharedArena(signature.specs + list(shard.outputs.specs), reduction.recv_handle(conn))
    count = len(signature.positional)
    args = arena.tensors[:count]
    kwargs = dict(zip(signature.keyword_names, arena.tensors[count : len(signature.specs)]))
    outputs = arena.tensors[len(signature.specs) :] if rank == 0 else []
    run, states = program_runner(shard.program)
    aliased = [(states[name], index) for name, index in shard.io_aliases.items()]
    protocol.send_reply(conn, os.getpid())
    while True:
        message = conn.recv_bytes()
        if message == protocol.STEP:
            with torch.inference_mode():
                results = run(*args, **kwargs)
                for destination, result in zip(outputs, results):
                    destination.copy_(result)
                for state, index in aliased:  # io_aliases: the next call reads this output
                    state.copy_(results[index])
            conn.send_bytes(protocol.DONE)
            continue
        command, *arguments = protocol.payload(message)
        if command == "close":
            arena.close()
            return
        if command == "save":
            save_dir, save_id = arguments
            protocol.send_reply(conn, _save(shard.program, Path(save_dir) / rank_program_file(rank, save_id)))
        else:
            raise ValueError(f"unknown worker command {command!r}")


def _save(program: torch.export.ExportedProgram, path: Path) -> tuple[str, int]:
    """Write the program to `path` and flush it to disk; return its sha256 and size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    fsync_path(path)
    fsync_path(path.parent)
    return file_sha256(path), os.path.getsize(path)

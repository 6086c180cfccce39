"""A pool of worker processes with a real gloo process group, reused across test cases.

`WorkerPool(world_size).run(fn, *args)` calls `fn(*args)` on every rank and
returns the per-rank results. `fn` must be importable (a module-level function).
If a rank raises, dies or times out, the pool is torn down (so no rank stays
blocked in a collective) and the error is re-raised with every failing rank's
traceback or exit code.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import traceback

import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300
ERROR_GRACE_S = 10


def _worker_main(rank: int, world_size: int, store_port: int, conn, backend: str, cuda: bool) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if cuda:  # one GPU: every rank on device 0; several: rank r on GPU r mod count (NCCL needs one each)
        torch.cuda.set_device(rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", store_port, world_size + 1, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    while True:
        message = conn.recv()
        if message is None:
            break
        fn, args, kwargs = message
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerError(AssertionError):
    """A test case failed on one or more ranks."""


class WorkerPool:
    """`world_size` spawned processes in one process group (gloo by default), kept alive between cases.

    `backend` is init_process_group's ("cpu:gloo,cuda:nccl" for NCCL with CPU tensors still on gloo);
    with `cuda` each rank selects its GPU before joining.
    """

    def __init__(self, world_size: int, env: dict[str, str] | None = None, backend: str = "gloo", cuda: bool = False):
        self.world_size = world_size
        # The rendezvous store lives here, in the parent, on a port the OS picks: no port race.
        self._store = dist.TCPStore(
            "127.0.0.1", 0, world_size + 1, is_master=True, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S),
            wait_for_workers=False,
        )
        context = mp.get_context("spawn")
        self._conns, self._procs = [], []
        saved_env = {key: os.environ.get(key) for key in (env or {})}
        os.environ.update(env or {})
        try:
            for rank in range(world_size):
                parent, child = context.Pipe()
                proc = context.Process(target=_worker_main, args=(rank, world_size, self._store.port, child, backend, cuda),
                                       daemon=True)
                proc.start()
                self._conns.append(parent)
                self._procs.append(proc)
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @property
    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self._procs)

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
        """Run `fn(*args, **kwargs)` on every rank; return the results in rank order."""
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        results, errors = [None] * self.world_size, {}
        for rank, conn in enumerate(self._conns):
            # Once one rank failed, the others get a short grace to report before the pool is torn down.
            status, value = self._answer(rank, conn, timeout if not errors else ERROR_GRACE_S)
            if status == "ok":
                results[rank] = value
            else:
                errors[rank] = value
        if errors:
            self.close(force=True)
            details = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in errors.items())
            raise WorkerError(f"{fn.__qualname__}{args!r:.200} failed on {len(errors)} of {self.world_size} ranks:\n{details}")
        return results

    def _answer(self, rank: int, conn, timeout: float) -> tuple[str, object]:
        proc = self._procs[rank]
        try:
            if conn.poll(timeout):
                return conn.recv()
        except (EOFError, OSError):  # the worker closed its end: it is exiting
            proc.join(timeout=ERROR_GRACE_S)
        if not proc.is_alive():
            return "error", f"worker process died (exit code {proc.exitcode})"
        return "error", f"no answer within {timeout} s"

    def close(self, force: bool = False) -> None:
        """Stop the workers (kill them when `force`)."""
        for conn, proc in zip(self._conns, self._procs):
            if force:
                proc.kill()
            elif proc.is_alive():
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    proc.kill()
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def with_model_parallel(tensor_parallel_size: int, fn, *args, **kwargs):
    """Worker-side: run `fn` between initialize_model_parallel and destroy_model_parallel."""
    from neuronx_distributed import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
    try:
        return fn(*args, **kwargs)
    finally:
        parallel_state.destroy_model_parallel()

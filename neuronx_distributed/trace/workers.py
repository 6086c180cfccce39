"""The caller's side of a traced model's worker processes: start, talk to, watch and stop them.

Every wait watches the workers' pipes and their process sentinels together, so a
worker that dies turns into `WorkerCrashedError` at once and one that raises into
`TraceWorkerError` (or the library error it raised, e.g. `TracedModelCorruptError`).
A wait also looks, every `_POLL_S`, whether a worker it waits for is stopped
(SIGSTOP, a job-control stop; read from /proc, so on Linux only) and, for a call,
whether the call timeout has passed: either ends in `WorkerTimeoutError` within
about a second. Every worker is stopped before any of these errors is raised.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import selectors
import signal
import time
from multiprocessing import reduction

import torch.distributed as dist
from tqdm import tqdm

from .. import errors
from ..errors import (
    MissingMainGuardError,
    TracedModelClosedError,
    TraceError,
    TraceWorkerError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from . import protocol
from .main_guard import MISSING_GUARD_EXIT_CODE, missing_guard_message
from .shared_arena import SharedArena
from .worker_main import worker_main

_CLOSE_TIMEOUT_S = 10.0
_POLL_S = 0.5  # how often a wait looks for stopped workers and for its deadline
DEFAULT_CALL_TIMEOUT_S = 600.0


def default_threads_per_worker(tp_degree: int) -> int:
    """The cores this process may run on (its CPU affinity, which the workers inherit) divided among
    the workers, at least one thread each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // tp_degree)


class WorkerGroup:
    """`tp_degree` spawned worker processes in one process group, each running one job."""

    def __init__(self, tp_degree: int, jobs: list, threads_per_worker: int, api_name: str,
                 call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S):
        self.tp_degree = tp_degree
        self.call_timeout_s = call_timeout_s
        self._api_name = api_name
        self._closed_because: str | None = None
        context = mp.get_context("spawn")
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self._conns, self._procs = [], []
        self._selector = selectors.DefaultSelector()
        try:
            for rank in range(tp_degree):
                conn, child_conn = context.Pipe(duplex=True)
                proc = context.Process(
                    target=worker_main,
                    args=(rank, tp_degree, self._store.port, child_conn, threads_per_worker),
                    name=f"nxd-tp-rank-{rank}",
                    daemon=True,
                )
                proc.start()
                child_conn.close()
                self._conns.append(conn)
                self._procs.append(proc)
                self._selector.register(conn, selectors.EVENT_READ, rank)
                self._selector.register(proc.sentinel, selectors.EVENT_READ, rank)
            for conn, job in zip(self._conns, jobs):
                protocol.send_command(conn, job)
            replies = self._collect(progress=f"{api_name} on {tp_degree} worker(s)")
            self.job_replies = [protocol.payload(message) for message in replies]
        except BaseException:
            self.kill()
            raise

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    @property
    def closed(self) -> bool:
        return self._closed_because is not None

    def share_arena(self, arena: SharedArena, signature) -> None:
        """Give every worker the arena's descriptor and the input signature to map it with."""
        for conn, proc in zip(self._conns, self._procs):
            protocol.send_command(conn, signature)
            reduction.send_handle(conn, arena.fd, proc.pid)
        self._collect()

    def step(self) -> None:
        """Run one call: every worker runs its program on the arena's inputs."""
        self.check_open()
        with self._stopped_if_interrupted():
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send_bytes(protocol.STEP)
                except OSError:
                    self._raise_crash(rank)
            self._collect(timeout_s=self.call_timeout_s)

    def command(self, *command) -> list:
        """Send a pickled command to every worker; return their replies in rank order."""
        self.check_open()
        with self._stopped_if_interrupted():
            for rank, conn in enumerate(self._conns):
                try:
                    protocol.send_command(conn, command)
                except OSError:
                    self._raise_crash(rank)
            return [protocol.payload(message) for message in self._collect()]

    @contextlib.contextmanager
    def _stopped_if_interrupted(self):
        """Stop the workers if the wait for their replies ends early (Ctrl-C, an error in this process).

        Their late replies would otherwise answer the next call, which would then
        return the previous call's outputs (or half-written ones).
        """
        try:
            yield
        except BaseException as error:
            if not self.closed:
                self.kill(f"a call was interrupted by {type(error).__name__}")
            raise

    def close(self) -> None:
        """Ask the workers to exit, wait for them, kill any that do not."""
        if self._closed_because is None:
            self._closed_because = "it was closed"
            for conn in self._conns:
                try:
                    protocol.send_command(conn, ("close",))
                except OSError:
                    pass
        self._stop(timeout=_CLOSE_TIMEOUT_S)

    def kill(self, reason: str = "a worker failed") -> None:
        """Stop every worker at once (they may be blocked in a collective)."""
        if self._closed_because is None:
            self._closed_because = reason
        self._stop(timeout=0)

    def _stop(self, timeout: float) -> None:
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns = []
        self._selector.close()
        self._store = None

    def check_open(self) -> None:
        """Raise TracedModelClosedError if the workers are stopped (closed, or after a failure)."""
        if self._closed_because is not None:
            raise TracedModelClosedError(
                f"this traced model's workers are stopped ({self._closed_because}); "
                "load it again with parallel_model_load or trace it again."
            )

    def _collect(self, progress: str | None = None, timeout_s: float | None = None) -> list[bytes]:
        """One message from every worker, in rank order; raise (after stopping all) if any fails, dies or stalls.

        With `progress`, a progress bar (ranks done, time elapsed) is shown while waiting;
        with `timeout_s`, workers that have not answered by then raise WorkerTimeoutError.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if progress is None:  # every inference call: no bar on the hot path
            return self._collect_replies(deadline, timeout_s)
        with tqdm(total=self.tp_degree, desc=progress, unit="rank") as bar:
            return self._collect_replies(deadline, timeout_s, bar)

    def _collect_replies(self, deadline: float | None, timeout_s: float | None, bar: tqdm | None = None) -> list[bytes]:
        replies: list[bytes | None] = [None] * self.tp_degree
        waiting = self.tp_degree
        stopped: set[int] = set()
        while waiting:
            events = self._selector.select(timeout=_POLL_S)
            if not events:
                if bar is not None:
                    bar.refresh()  # keeps the elapsed time moving
                pending = [rank for rank, reply in enumerate(replies) if reply is None]
                stopped = self._check_responsive(pending, deadline, timeout_s, stopped)
            for key, _ in events:
                rank = key.data
                conn = self._conns[rank]
                if key.fileobj is not conn and not conn.poll():
                    self._raise_crash(rank)  # its sentinel fired and it left no message: it died
                if replies[rank] is not None:
                    continue
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    self._raise_crash(rank)
                if message[:1] == protocol.FAILED:
                    dead = [other for other, proc in enumerate(self._procs) if _died(proc) and other != rank]
                    if dead:  # the failure is a consequence (a collective lost its peer): report the cause
                        self._raise_crash(dead[0])
                    self.kill(f"tp rank {rank} raised")
                    name, text = protocol.failure(message)
                    error_type = getattr(errors, name, None)
                    if not (isinstance(error_type, type) and issubclass(error_type, TraceError)):
                        error_type = TraceWorkerError  # the user's code (or torch) raised: its traceback says what
                    raise error_type(f"tp rank {rank} of {self.tp_degree} raised in {self._api_name}:\n{text}")
                replies[rank] = message
                waiting -= 1
                if bar is not None:
                    bar.update()
        return replies

    def _check_responsive(self, pending: list[int], deadline: float | None, timeout_s: float | None,
                          stopped_before: set[int]) -> set[int]:
        """Raise WorkerTimeoutError (after stopping every worker) if time is up or a pending worker stays stopped.

        A worker counts as stopped when two polls in a row find it so (a profiler's
        brief ptrace stop does not); returns the pending workers stopped now.
        """
        stopped = {rank for rank in pending if _is_stopped(self._procs[rank].pid)}
        if stopped & stopped_before:
            rank = min(stopped & stopped_before)
            self.kill(f"tp rank {rank} was stopped")
            raise WorkerTimeoutError(
                f"tp rank {rank} of {self.tp_degree} (pid {self._procs[rank].pid}) is stopped (SIGSTOP or a "
                f"job-control stop) during {self._api_name}, so the other ranks would wait for it; every worker is "
                "stopped. Load or trace the model again, and do not stop its worker processes."
            )
        if deadline is not None and time.monotonic() > deadline:
            self.kill(f"a call took longer than {timeout_s} s")
            raise WorkerTimeoutError(
                f"tp rank(s) {pending} of {self.tp_degree} did not finish a call within call_timeout_s={timeout_s} s; "
                "every worker is stopped. If the model needs longer per call, load or trace it again with a larger "
                "call_timeout_s (None waits without limit)."
            )
        return stopped

    def _raise_crash(self, rank: int):
        proc = self._procs[rank]
        proc.join(1.0)
        code = proc.exitcode
        self.kill(f"tp rank {rank} died")
        if code == MISSING_GUARD_EXIT_CODE:
            raise MissingMainGuardError(missing_guard_message(self._api_name))
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        raise WorkerCrashedError(
            f"tp rank {rank} of {self.tp_degree} (pid {proc.pid}) died with {how} in {self._api_name}; "
            "every worker is stopped. Check its output above (out of memory? a crash in native code?), "
            "then trace or load the model again."
        )


def _is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped by a signal or a tracer (Linux /proc; False where that is not available)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            text = stat_file.read()
    except OSError:
        return False
    state = text[text.rfind(b")") + 2 :][:1]  # the field after the command name, which may hold spaces
    return state in (b"T", b"t")


def _died(proc: mp.process.BaseProcess) -> bool:
    """Exited abnormally: killed by a signal or a non-zero status (a worker that reported an error exits 0)."""
    return not proc.is_alive() and proc.exitcode != 0

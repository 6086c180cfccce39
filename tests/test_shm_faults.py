"""Failure cases of the shared-memory engine with real processes: a rank killed with SIGKILL,
a stalled rank, a rank interrupted with Ctrl-C while it waits, and segments left behind. Each case launches its own job (gloo over a file
store) because ranks die in it; every surviving rank must raise CollectiveError naming the
group and the missing rank instead of hanging, and /dev/shm must end up clean.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time

import pytest

RESULT_TIMEOUT_S = 120


def _segments_of(pids) -> list[str]:
    """Our segments in /dev/shm created by one of `pids` (named nxd-<uid>-<pidns>-<pid>-<token>)."""
    found = []
    for name in os.listdir("/dev/shm"):
        parts = name.split("-")
        if len(parts) == 5 and parts[0] == "nxd" and parts[1] == str(os.getuid()) and int(parts[3]) in pids:
            found.append(name)
    return found


def _rank_main(rank: int, world: int, store: str, scenario, results) -> None:
    import torch
    import torch.distributed as dist

    from neuronx_distributed import comm

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    comm.set_backend("shm")
    try:
        outcome = f"returned {scenario(rank)!r}"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        outcome = f"{type(error).__name__}: {error}"
    results.put((rank, outcome))
    results.close()
    results.join_thread()  # the queue sends from a thread: flush before exiting hard
    # Skip torch.distributed's teardown: it may wait for the dead rank.
    os._exit(0)


def _process_context():
    """Fresh processes forked from a server that imported torch once (spawning costs seconds each)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "neuronx_distributed.comm"])
    return context


def _run_job(world: int, scenario) -> tuple[dict[int, str], dict[int, int], list[int]]:
    """Run `scenario(rank)` on `world` fresh ranks; return outcomes, exit codes and pids."""
    context = _process_context()
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="nxd-faults-") as tmp:
        procs = [
            context.Process(target=_rank_main, args=(rank, world, os.path.join(tmp, "store"), scenario, results))
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        outcomes = {}
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while len(outcomes) < world and time.monotonic() < deadline:
            if all(not proc.is_alive() for proc in procs) and results.empty():
                break
            try:
                rank, outcome = results.get(timeout=0.2)
                outcomes[rank] = outcome
            except queue.Empty:
                continue
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return outcomes, {rank: proc.exitcode for rank, proc in enumerate(procs)}, [proc.pid for proc in procs]


def kill_last_rank(rank: int):
    import torch
    import torch.distributed as dist

    from neuronx_distributed import comm

    data = torch.ones(1000)
    comm.all_reduce(data, group=dist.group.WORLD)  # sets the group up
    if rank == dist.get_world_size() - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    comm.all_reduce(data, group=dist.group.WORLD)
    return "completed"


def test_killed_rank_makes_every_peer_raise_naming_it():
    # The survivors leave through an exception, the killed rank through SIGKILL: no segment either way.
    outcomes, exit_codes, pids = _run_job(3, kill_last_rank)
    assert exit_codes[2] == -signal.SIGKILL
    for rank in (0, 1):
        assert outcomes[rank].startswith("CollectiveError"), outcomes
        assert "global rank 2" in outcomes[rank] and "group [0, 1, 2]" in outcomes[rank], outcomes[rank]
    assert "exited" in outcomes[0] + outcomes[1]
    assert _segments_of(pids) == []


def stall_last_rank(rank: int):
    import torch
    import torch.distributed as dist

    from neuronx_distributed import comm

    comm.set_backend("shm", timeout_s=0.5)
    data = torch.ones(10)
    comm.all_reduce(data, group=dist.group.WORLD)
    if rank == dist.get_world_size() - 1:
        time.sleep(2)  # alive, but far past its peers' timeout
    comm.all_reduce(data, group=dist.group.WORLD)
    return "completed"


def test_stalled_rank_times_out_and_is_named():
    outcomes, _, pids = _run_job(2, stall_last_rank)
    assert outcomes[0].startswith("CollectiveError"), outcomes
    assert "rank 1 (global rank 1" in outcomes[0] and "did not reach all_reduce" in outcomes[0], outcomes[0]
    # The late rank finds the group aborted instead of waiting for its own timeout.
    assert outcomes[1].startswith("CollectiveError") and "aborted because rank 0" in outcomes[1], outcomes[1]
    assert _segments_of(pids) == []


def create_segment_then_die(rank: int):
    import torch.distributed as dist

    from neuronx_distributed import _C

    dist.barrier()  # every rank's gloo connections are up, so no rank fails on a peer that died first
    # Rank 0 creates a group segment, and every rank dies before anyone attached to it.
    group = _C.ShmGroup.create(_C.segment_name("orphan"), 0, [0, 1], 1 << 20, 5.0) if rank == 0 else None
    os.kill(os.getpid(), signal.SIGKILL)
    return group


def one_all_reduce(rank: int):
    import torch
    import torch.distributed as dist

    from neuronx_distributed import comm

    data = torch.full((3,), float(rank))
    comm.all_reduce(data, group=dist.group.WORLD)
    return data.tolist()


def test_segment_of_a_job_killed_during_setup_is_removed_by_the_next_run():
    # ... and the next run (which exits normally) leaves none of its own.
    _, exit_codes, dead_pids = _run_job(2, create_segment_then_die)
    assert set(exit_codes.values()) == {-signal.SIGKILL}
    assert len(_segments_of(dead_pids)) == 1
    outcomes, _, pids = _run_job(2, one_all_reduce)
    assert outcomes == {0: "returned [1.0, 1.0, 1.0]", 1: "returned [1.0, 1.0, 1.0]"}
    assert _segments_of(dead_pids) == [] and _segments_of(pids) == []


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_bad_timeout_setting_is_rejected(monkeypatch, value):
    from neuronx_distributed.comm import settings
    from neuronx_distributed.errors import CommBackendError

    monkeypatch.setenv(settings.TIMEOUT_ENV, value)
    with pytest.raises(CommBackendError, match="NXD_COMM_TIMEOUT"):
        settings.current()


INTERRUPT_ANSWER_S = 10  # generous: the engine looks for pending signals every 50 ms while it waits


def _interrupted_rank_main(rank: int, store: str, release, results) -> None:
    import torch
    import torch.distributed as dist

    from neuronx_distributed import comm

    signal.signal(signal.SIGINT, signal.default_int_handler)  # what a plain `python script.py` has
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    comm.set_backend("shm", timeout_s=600)  # far beyond the test: only the interruption can end rank 0's wait
    data = torch.ones(1000)
    comm.all_reduce(data, group=dist.group.WORLD)  # sets the group up
    if rank == 1:
        release.wait(timeout=RESULT_TIMEOUT_S)  # the peer stays away until rank 0 has answered (or the test gave up)
    else:
        results.put((rank, "waiting"))
    try:
        comm.all_reduce(data, group=dist.group.WORLD)
        outcome = "returned"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        outcome = f"{type(error).__name__}: {error}"
    results.put((rank, outcome))
    results.close()
    results.join_thread()
    os._exit(0)


def test_ctrl_c_reaches_a_rank_blocked_in_a_shared_memory_wait_and_its_peer_learns_why():
    context = _process_context()
    results, release = context.Queue(), context.Event()
    with tempfile.TemporaryDirectory(prefix="nxd-faults-") as tmp:
        procs = [
            context.Process(target=_interrupted_rank_main, args=(rank, os.path.join(tmp, "store"), release, results))
            for rank in range(2)
        ]
        for proc in procs:
            proc.start()
        try:
            assert results.get(timeout=RESULT_TIMEOUT_S) == (0, "waiting")
            time.sleep(1.0)  # rank 0 is past the spinning and asleep in the engine's wait by now
            os.kill(procs[0].pid, signal.SIGINT)
            try:
                first = results.get(timeout=INTERRUPT_ANSWER_S)
            except queue.Empty:
                first = (0, f"no answer within {INTERRUPT_ANSWER_S} s while its peer stayed away")
            release.set()
            second = results.get(timeout=RESULT_TIMEOUT_S)
        finally:
            release.set()
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    assert first == (0, "KeyboardInterrupt"), first
    rank, outcome = second
    assert rank == 1 and outcome.startswith("CollectiveError"), second
    assert "rank 0 (global rank 0" in outcome and "was interrupted" in outcome, outcome
    assert _segments_of([proc.pid for proc in procs]) == []

"""All-reduce latency and bandwidth, 4 KB to 64 MB, launched the way users launch (torchrun, TCP store):

    torchrun --standalone --nproc_per_node=2 benchmarks/allreduce.py [--rounds 31] [--sizes 4KB,1MB]

One row per path to the same collective, all measured in the same run:
  engine    the shared-memory engine's own call: the bound C++ function on a DLPack capsule
  op        torch.ops.nxd.shm_all_reduce_ (what torch.compile / torch.export record)
  comm      neuronx_distributed.comm.all_reduce (validation, the group's engine, dispatch)
  gloo      torch.distributed.all_reduce on the default (gloo) group, as a user's script calls it
  memcpy    single-thread copy of the same bytes by rank 0 alone (its peers wait), the physical limit

The paths are interleaved: each round times one batch of calls of every path, in an order shuffled
from round to round, so that load from other processes falls on all of them alike. Each call is
timed on its own and a batch counts as its median call (the few calls that waited for a
descheduled peer do not sway it); a path's time is the median over rounds [IQR: 25th to
75th percentile], and the ratio columns are medians of the per-round ratios [IQR].

On a machine shared with other jobs, a rank that spins for its peer while the peer waits for a
core measures the scheduler, not the engine. `chrt -f 1 torchrun ...` (real-time FIFO priority,
root only) lets both ranks run whenever they are runnable, as on dedicated cores; it holds the
cores for the run (under a minute). The table's first line says how the ranks were scheduled.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils.dlpack import to_dlpack

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
PATHS = ["engine", "op", "comm", "gloo", "memcpy"]


def calls_per_batch(nbytes: int) -> int:
    """Calls timed in one batch: 200 for small tensors, fewer from 256 KB up, one from 32 MB up."""
    return max(1, min(200, (32 << 20) // nbytes))


def batch_timer(fn):
    """A timer of `fn` (a collective: every rank makes as many calls): the median seconds of one call in a
    batch, after untimed calls (a tenth as many, at least one) that bring every rank into step."""

    def median_seconds(calls: int) -> float:
        for _ in range(max(1, calls // 10)):
            fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_seconds


def memcpy_timer(rank: int, src: torch.Tensor, dst: torch.Tensor):
    """A timer of rank 0 copying `src` into `dst` while the other ranks wait in a gloo barrier (blocked,
    not spinning, so rank 0 has a core to itself); the barrier is outside the timed part."""

    def median_seconds(calls: int) -> float:
        times = []
        if rank == 0:
            for _ in range(calls):
                start = time.perf_counter()
                dst.copy_(src)
                times.append(time.perf_counter() - start)
        dist.barrier()
        return statistics.median(times) if times else 0.0

    return median_seconds


def measure(timers: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """Per-round median seconds per call of every path, the paths interleaved in an order shuffled
    from round to round (alike on every rank), so that no path always follows the same one."""
    for timer in timers.values():  # warm-up
        timer(calls)
    per_round = {name: [] for name in timers}
    for round_index in range(rounds):
        order = list(timers)
        random.Random(round_index).shuffle(order)
        for name in order:
            per_round[name].append(timers[name](calls))
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds per size")
    parser.add_argument(
        "--sizes", default=",".join(_size(n) for n in SIZES), help="comma-separated sizes, e.g. 4KB,1MB"
    )
    args = parser.parse_args()
    sizes = [_parse_size(text, parser) for text in args.sizes.split(",")]
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the table shows quartiles over rounds)")

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment: TCP store, as users launch
    from neuronx_distributed import comm

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    engines = comm.set_up(group)
    if engines.shm is None:
        raise SystemExit("the shared-memory engine does not serve this group (extension not built?)")
    handle, name = engines.shm.handle, group.group_name
    shm_op = torch.ops.nxd.shm_all_reduce_.default

    results = {}
    for nbytes in sizes:
        tensor = torch.zeros(nbytes // 4)
        src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
        paths = {
            "engine": lambda: handle.all_reduce(to_dlpack(tensor), "sum"),
            "op": lambda: shm_op(tensor, "sum", name),
            "comm": lambda: comm.all_reduce(tensor, group=group),
            "gloo": lambda: dist.all_reduce(tensor),
        }
        for path, fn in paths.items():
            tensor.fill_(rank + 1)
            fn()
            if not torch.all(tensor == world * (world + 1) // 2):
                raise RuntimeError(f"{path} gave a wrong sum at {nbytes} bytes")
        tensor.zero_()  # sums of zeros stay finite however many calls follow
        timers = {path: batch_timer(fn) for path, fn in paths.items()}
        timers["memcpy"] = memcpy_timer(rank, src, dst)
        results[nbytes] = measure(timers, args.rounds, calls_per_batch(nbytes))
    if rank == 0:
        _print(results, world, args.rounds)
    dist.destroy_process_group()


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _print(results: dict, world: int, rounds: int) -> None:
    print(
        f"all_reduce (sum, float32), {world} processes under torchrun on {os.cpu_count()} cores, "
        f"{_scheduling()}; {rounds} interleaved rounds per size; us per call: median [IQR] over rounds "
        "of each round's median call; ratios: median of per-round ratios [IQR]"
    )
    header = (
        f"{'size':>6} | {'path':<6} | {'us/call':>9} | {'IQR us':>19} | {'this/engine':>20} | "
        f"{'gloo/this':>20} | {'GB/s':>6} | {'of memcpy':>9}"
    )
    print(header)
    print("-" * len(header))
    for nbytes, per_round in results.items():
        for path in PATHS:
            times = per_round[path]
            q1, median, q3 = _quartiles(times)
            collective = path != "memcpy"
            over_engine = _ratio([t / e for t, e in zip(times, per_round["engine"])]) if collective else "-"
            gloo_over = _ratio([g / t for g, t in zip(per_round["gloo"], times)]) if collective else "-"
            of_memcpy = statistics.median(c / t for c, t in zip(per_round["memcpy"], times))
            print(
                f"{_size(nbytes):>6} | {path:<6} | {median * 1e6:9.1f} | {q1 * 1e6:8.1f} - {q3 * 1e6:8.1f} | "
                f"{over_engine:>20} | {gloo_over:>20} | {nbytes / median / 1e9:6.2f} | {of_memcpy * 100:8.0f}%"
            )
        print("-" * len(header))


def _scheduling() -> str:
    """How this process is scheduled: the policy and its priority or niceness."""
    policy = os.sched_getscheduler(0)
    if policy in (os.SCHED_FIFO, os.SCHED_RR):
        name = "SCHED_FIFO" if policy == os.SCHED_FIFO else "SCHED_RR"
        return f"{name} priority {os.sched_getparam(0).sched_priority}"
    return f"SCHED_OTHER niceness {os.nice(0)}"


def _ratio(ratios: list[float]) -> str:
    q1, median, q3 = _quartiles(ratios)
    return f"{median:6.2f}x [{q1:.2f}-{q3:.2f}]"


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20}MB" if nbytes >= 1 << 20 else f"{nbytes >> 10}KB"


def _parse_size(text: str, parser: argparse.ArgumentParser) -> int:
    number, unit = text.strip()[:-2], text.strip()[-2:].upper()
    if not number.isdigit() or unit not in ("KB", "MB") or int(number) == 0:
        parser.error(f"size {text!r} is not like 4KB or 16MB")
    return int(number) << (10 if unit == "KB" else 20)


if __name__ == "__main__":
    main()

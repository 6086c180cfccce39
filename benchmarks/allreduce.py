"""All-reduce latency and bandwidth, 4 KB to 64 MB, launched the way users launch (torchrun, TCP store):

    torchrun --standalone --nproc_per_node=2 benchmarks/allreduce.py [--calls 200]

Rank 0 prints one table; each row is one path to the same collective, measured in the same run:
  engine    the shared-memory engine's own call: the bound C++ function on a DLPack capsule
  op        torch.ops.nxd.shm_all_reduce_ (what torch.compile / torch.export record)
  comm      neuronx_distributed.comm.all_reduce (validation, the group's engine, dispatch)
  gloo      torch.distributed.all_reduce on a gloo group
next to single-thread memcpy of the same bytes in one process, the physical limit.
Times are medians of per-call times after a warm-up; GB/s = tensor bytes / time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils.dlpack import to_dlpack

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]


def median_seconds(fn, calls: int) -> float:
    """Median seconds of one call of `fn` over `calls` calls (every rank makes as many), after a warm-up."""
    for _ in range(min(calls, 20)):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calls_for(nbytes: int, calls: int) -> int:
    """Fewer calls for large tensors, so that every size takes about as long."""
    return max(10, min(calls, calls * (1 << 20) // max(nbytes, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per row at 1 MB and below")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment: TCP store, as users launch
    from neuronx_distributed import comm

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    gloo_group = dist.new_group(list(range(world)))
    engines = comm.set_up(group)
    if engines.shm is None:
        raise SystemExit("the shared-memory engine does not serve this group (extension not built?)")
    handle, name = engines.shm.handle, group.group_name
    shm_op = torch.ops.nxd.shm_all_reduce_.default

    rows = {}
    for nbytes in SIZES:
        n = calls_for(nbytes, args.calls)
        tensor = torch.zeros(nbytes // 4)
        paths = {
            "engine": lambda: handle.all_reduce(to_dlpack(tensor), "sum"),
            "op": lambda: shm_op(tensor, "sum", name),
            "comm": lambda: comm.all_reduce(tensor, group=group),
            "gloo": lambda: dist.all_reduce(tensor, group=gloo_group),
        }
        rows[nbytes] = {path: median_seconds(fn, n) for path, fn in paths.items()}
        for path, fn in paths.items():
            tensor.fill_(rank + 1)
            fn()
            if not torch.all(tensor == world * (world + 1) // 2):
                raise RuntimeError(f"{path} gave a wrong sum at {nbytes} bytes")
        if rank == 0:
            src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
            rows[nbytes]["memcpy"] = median_seconds(lambda: dst.copy_(src), n)
        dist.barrier(group=gloo_group)
    if rank == 0:
        _print(rows, world)
    dist.destroy_process_group()


def _print(rows: dict, world: int) -> None:
    print(f"all_reduce (sum, float32), {world} processes under torchrun on {os.cpu_count()} cores; "
          "median us per call; GB/s = tensor bytes / time")
    header = (f"{'size':>6} | {'engine':>8} | {'op':>8} | {'comm':>8} | {'gloo':>9} | {'comm/engine':>11} | "
              f"{'gloo/comm':>9} | {'comm GB/s':>9} | {'memcpy GB/s':>11} | {'comm/memcpy':>11}")
    print(header)
    print("-" * len(header))
    for nbytes, row in rows.items():
        engine, op, via_comm, gloo, copy = (row[k] for k in ("engine", "op", "comm", "gloo", "memcpy"))
        print(f"{_size(nbytes):>6} | {engine * 1e6:8.1f} | {op * 1e6:8.1f} | {via_comm * 1e6:8.1f} | {gloo * 1e6:9.1f} | "
              f"{via_comm / engine:10.2f}x | {gloo / via_comm:8.1f}x | {nbytes / via_comm / 1e9:9.2f} | "
              f"{nbytes / copy / 1e9:11.2f} | {copy / via_comm * 100:10.0f}%")


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


if __name__ == "__main__":
    main()

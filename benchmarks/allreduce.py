"""All-reduce latency and bandwidth, 4 KB to 64 MB, between 2 processes: the shared-memory
engine against gloo, both through `neuronx_distributed.comm`, next to single-thread memcpy
bandwidth in one process as the physical limit. Prints one table.

    python benchmarks/allreduce.py [--world-size 2] [--seconds 0.3]

Bandwidth is algorithm bandwidth: tensor bytes / time per all-reduce.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20, 64 << 20]
ENGINES = ("shm", "torch")


def _seconds_per_call(fn, budget_s: float, agree=None, rounds: int = 5) -> float:
    """Median over `rounds` of the average seconds per call of `fn`, after a warm-up.

    `agree(local_decision)` returns rank 0's decision on every rank, so that all ranks make
    the same number of calls; it is None in a single process.
    """
    agree = agree or (lambda decision: decision)
    for _ in range(3):
        fn()
    per_call = []
    for _ in range(rounds):
        calls, batch, start = 0, 1, time.perf_counter()
        while True:
            for _ in range(batch):
                fn()
            calls += batch
            elapsed = time.perf_counter() - start
            if agree(elapsed >= budget_s / rounds):
                break
            batch = min(batch * 2, 1024)
        per_call.append(elapsed / calls)
    return statistics.median(per_call)


def _worker(rank: int, world_size: int, store: str, seconds: float, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    from neuronx_distributed import comm

    group = dist.new_group(list(range(world_size)))
    flag = torch.zeros(1)

    def agree(value: bool) -> bool:
        flag.fill_(float(value))
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    timings = {}
    for engine in ENGINES:
        os.environ[comm.BACKEND_ENV] = engine
        for nbytes in SIZES:
            tensor = torch.zeros(nbytes // 4)
            timings[engine, nbytes] = _seconds_per_call(lambda: comm.all_reduce(tensor, group=group), seconds, agree)
            tensor.fill_(rank + 1)
            comm.all_reduce(tensor, group=group)
            if not torch.all(tensor == world_size * (world_size + 1) // 2):
                raise RuntimeError(f"the {engine} engine's all_reduce gave a wrong sum")
    if rank == 0:
        results.put(timings)
    dist.destroy_process_group()


def memcpy_seconds(nbytes: int, seconds: float) -> float:
    torch.set_num_threads(1)
    src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    return _seconds_per_call(lambda: dst.copy_(src), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.3, help="measuring time per size and engine")
    args = parser.parse_args()

    memcpy = {nbytes: memcpy_seconds(nbytes, args.seconds) for nbytes in SIZES}
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="nxd-bench-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            context.Process(target=_worker, args=(rank, args.world_size, store, args.seconds, results))
            for rank in range(args.world_size)
        ]
        for proc in procs:
            proc.start()
        timings = results.get()
        for proc in procs:
            proc.join()

    print(f"all_reduce (sum, float32), {args.world_size} processes on {os.cpu_count()} cores; "
          "GB/s = tensor bytes / time")
    header = f"{'size':>8} | {'shm us':>9} | {'gloo us':>9} | {'shm/gloo':>8} | {'shm GB/s':>8} | {'gloo GB/s':>9} | {'memcpy GB/s':>11} | {'shm/memcpy':>10}"
    print(header)
    print("-" * len(header))
    for nbytes in SIZES:
        shm, gloo, copy = timings["shm", nbytes], timings["torch", nbytes], memcpy[nbytes]
        print(
            f"{_size(nbytes):>8} | {shm * 1e6:9.1f} | {gloo * 1e6:9.1f} | {gloo / shm:7.1f}x | "
            f"{nbytes / shm / 1e9:8.2f} | {nbytes / gloo / 1e9:9.2f} | {nbytes / copy / 1e9:11.2f} | "
            f"{copy / shm * 100:9.0f}%"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


if __name__ == "__main__":
    main()

"""Hierarchical all-reduce across nodes vs plain gloo over the same ranks, measured in the same run.

On this machine, 2 simulated nodes x 2 ranks (tests/nodes.py: each node its own hostname,
/dev/shm and PIDs; torchrun with a c10d rendezvous at 127.0.0.1, gloo over loopback):

    python benchmarks/hierarchical.py [--sizes-mb 1 25 100] [--calls 15]

On real nodes, the same measurement under torchrun, run on every node:

    torchrun --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \\
        benchmarks/hierarchical.py [--sizes-mb ...]

Rows, each on a group of all the ranks:
  nxd       neuronx_distributed.comm.all_reduce: shared memory inside each node, gloo across on 1/k
  gloo      torch.distributed.all_reduce on a gloo group
The two alternate call by call (so load on the machine hits both alike); a call's time is the
slowest rank's, from a barrier to its return; the table gives medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def measure(sizes_mb: list[float], calls: int) -> dict:
    """On every rank of a live job: {size_mb: {"nxd": seconds, "gloo": seconds}}, medians of the slowest rank."""
    from neuronx_distributed import comm

    torch.set_num_threads(1)
    world = dist.get_world_size()
    nxd_group, gloo_group = dist.new_group(list(range(world))), dist.new_group(list(range(world)))
    engine = comm.engine_for(nxd_group, torch.empty(0)).name
    rows = {}
    for size_mb in sizes_mb:
        tensor = torch.randn(int(size_mb * (1 << 20)) // 4)
        paths = {
            "nxd": lambda: comm.all_reduce(tensor, group=nxd_group),
            "gloo": lambda: dist.all_reduce(tensor, group=gloo_group),
        }
        times = {name: [] for name in paths}
        for call in range(calls + 2):  # the first two rounds warm up
            for name, run in paths.items():
                dist.barrier(group=gloo_group)
                start = time.perf_counter()
                run()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=gloo_group)
                if call >= 2:
                    times[name].append(elapsed.item())
        rows[str(size_mb)] = {name: statistics.median(values) for name, values in times.items()}
    return {"engine": engine, "world": world, "rows": rows}


def table(result: dict, layout: str) -> str:
    lines = [
        f"all_reduce (sum, float32) over {result['world']} ranks, {layout}, {os.cpu_count()} cores; "
        f"nxd engine: {result['engine']}",
        f"{'size':>8} {'nxd ms':>9} {'gloo ms':>9} {'nxd GB/s':>9} {'gloo GB/s':>10} {'speed-up':>9}",
    ]
    for size_mb, row in result["rows"].items():
        nbytes = float(size_mb) * (1 << 20)
        lines.append(
            f"{float(size_mb):>6g}MB {row['nxd'] * 1e3:>9.1f} {row['gloo'] * 1e3:>9.1f} "
            f"{nbytes / row['nxd'] / 1e9:>9.2f} {nbytes / row['gloo'] / 1e9:>10.2f} {row['gloo'] / row['nxd']:>8.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 25, 100])
    parser.add_argument("--calls", type=int, default=15, help="timed calls per row and path")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the simulated nodes are killed")
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun on real nodes
        dist.init_process_group("gloo")
        result = measure(args.sizes_mb, args.calls)
        if dist.get_rank() == 0:
            nodes = os.environ["GROUP_WORLD_SIZE"]
            print(table(result, f"{nodes} nodes x {os.environ['LOCAL_WORLD_SIZE']} under torchrun"))
        dist.destroy_process_group()
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from nodes import run_on_nodes, unavailable

    reason = unavailable()
    if reason is not None:
        raise SystemExit(reason)
    call = [None, "hierarchical:measure", [args.sizes_mb, args.calls]]
    run = run_on_nodes([call], nodes=2, procs_per_node=2, timeout_s=args.timeout,
                       env={"PYTHONPATH": str(Path(__file__).resolve().parent)})  # fmt: skip
    print(table(run.values(0)[0], "2 simulated nodes x 2 (torchrun, c10d rendezvous)"))


if __name__ == "__main__":
    main()

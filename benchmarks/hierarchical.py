"""Hierarchical all-reduce across nodes vs plain gloo over the same ranks, measured in the same run.

On this machine, 2 simulated nodes x 2 ranks (tests/nodes.py: each node its own hostname,
/dev/shm and PIDs; torchrun with a c10d rendezvous at 127.0.0.1, gloo over loopback):

    python benchmarks/hierarchical.py [--sizes-mb 1 25 100] [--calls 15] [--phases]

On real nodes, the same measurement under torchrun, run on every node:

    torchrun --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \\
        benchmarks/hierarchical.py [--sizes-mb ...]

Rows, each on a group of all the ranks:
  nxd       neuronx_distributed.comm.all_reduce: shared memory inside each node, gloo across on 1/k
  gloo      torch.distributed.all_reduce on a gloo group
and, with --phases, the hierarchical engine's steps, each alone on the whole tensor (what the
engine runs one after the other):
  agree                the call's description compared over the group (shm max inside each host, a gloo
                       all-gather among the hosts' local ranks 0, the verdict broadcast in shm)
  local reduce-scatter shared memory, in place: local rank l ends with its host's sum of slice l
  gloo across          torch.distributed.all_reduce of slice l among the local-index-l ranks
  local all-gather     one shared-memory broadcast from each local rank, in place
Where the time goes on simulated nodes: gloo's "network" is loopback TCP, which costs about one
memcpy per byte on each side, so per rank plain gloo moves 3 copies of the tensor (a ring over 4
ranks) and the hierarchical engine 2.5 (half into shared memory, half sent and half received
across, one in the all-gather), both reducing 3/4 of it; with 4 ranks on 2 busy cores the CPU
time decides, and the speed-up stays near that ratio. Across real
hosts the cross-host part runs as k gloo all-reduces of 1/k of the data each, over H hosts
instead of a ring over all H x k ranks (2(H-1) steps each instead of 2(Hk-1)).
`agree` is a fixed cost per call: 1.2-1.4 ms on a quiet machine (2026-12, medians of 500
calls from a barrier, 1.4-1.9 ms in the agree row at --calls 15; 2.2-2.6 ms when every across
sub-group ran a gloo max: two tiny gloo all-reduces at once took 1.5 ms there, one 0.8 ms,
one all-gather 0.5 ms, one broadcast 0.4 ms), a quarter to a third of nxd's time at 1 MB,
which is why nxd trails gloo there. On a loaded machine each of its two shared-memory steps
waits for the host's ranks to get a core (1.4 ms each at a load of 6-8), and agree took 3.4
ms either way.

All rows alternate call by call (so load on the machine hits them alike); a call's time is the
slowest rank's, from a barrier to its return. The table gives the median and the range (min-max)
of the calls, and the CPU time (user + system, every thread) summed over the ranks, median.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.dlpack import to_dlpack


def _phases(engine, tensor: torch.Tensor) -> dict:
    """The hierarchical engine's steps on `tensor` (see the module docstring), as separate calls."""
    from neuronx_distributed.comm.hierarchical import Call

    handle, k = engine.local.handle, engine.local.handle.size
    rows = tensor.view(k, -1)
    mine = rows[engine.local_index]

    def all_gather():
        for root in range(k):
            handle.broadcast(to_dlpack(rows[root]), root)

    return {
        "agree": lambda: engine.agree(Call("all_reduce", engine.name, tensor.dtype, tensor.numel())),
        "local reduce-scatter": lambda: handle.reduce_scatter(to_dlpack(rows), to_dlpack(mine), "sum"),
        "gloo across": lambda: dist.all_reduce(mine, group=engine.across.group),
        "local all-gather": all_gather,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(sizes_mb: list[float], calls: int, phases: bool) -> dict:
    """On every rank of a live job: {size_mb: {row: {"median", "min", "max", "cpu"}}} in seconds: the
    slowest rank's wall time per call, and the CPU time summed over the ranks."""
    from neuronx_distributed import comm

    torch.set_num_threads(1)
    world = dist.get_world_size()
    nxd_group, gloo_group = dist.new_group(list(range(world))), dist.new_group(list(range(world)))
    engine = comm.engine_for(nxd_group, torch.empty(0))
    rows = {}
    for size_mb in sizes_mb:
        # Zeros: every call sums into the tensor, and zeros never overflow (the values do not change the time).
        tensor = torch.zeros(int(size_mb * (1 << 20)) // 4 // world * world)
        paths = {
            "nxd": lambda: comm.all_reduce(tensor, group=nxd_group),
            "gloo": lambda: dist.all_reduce(tensor, group=gloo_group),
        }
        if phases and engine.name == "hierarchical":
            paths.update(_phases(engine, tensor))
        wall, cpu = {name: [] for name in paths}, {name: [] for name in paths}
        for call in range(calls + 2):  # the first two rounds warm up
            for name, run in paths.items():
                dist.barrier(group=gloo_group)
                start, start_cpu = time.perf_counter(), _cpu_seconds()
                run()
                spent = torch.tensor([time.perf_counter() - start, _cpu_seconds() - start_cpu], dtype=torch.float64)
                slowest = spent[:1].clone()
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=gloo_group)
                dist.all_reduce(spent, group=gloo_group)
                if call >= 2:
                    wall[name].append(slowest.item())
                    cpu[name].append(spent[1].item())
        rows[str(size_mb)] = {
            name: {"median": statistics.median(times), "min": min(times), "max": max(times),
                   "cpu": statistics.median(cpu[name])}
            for name, times in wall.items()
        }  # fmt: skip
    return {"engine": engine.name, "world": world, "rows": rows}


def table(result: dict, layout: str) -> str:
    lines = [
        f"all_reduce (sum, float32) over {result['world']} ranks, {layout}, {os.cpu_count()} cores; "
        f"nxd engine: {result['engine']}",
        f"{'size':>8} {'row':<21} {'ms':>7} {'range ms':>13} {'cpu ms':>7} {'GB/s':>6} {'vs gloo':>8}",
    ]
    for size_mb, row in result["rows"].items():
        nbytes = float(size_mb) * (1 << 20)
        for name, times in row.items():
            lines.append(
                f"{float(size_mb):>6g}MB {name:<21} {times['median'] * 1e3:>7.1f} "
                f"{times['min'] * 1e3:>6.1f}-{times['max'] * 1e3:<6.1f} {times['cpu'] * 1e3:>7.1f} "
                f"{nbytes / times['median'] / 1e9:>6.2f} {row['gloo']['median'] / times['median']:>7.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 25, 100])
    parser.add_argument("--calls", type=int, default=15, help="timed calls per row")
    parser.add_argument("--phases", action="store_true", help="also time the hierarchical engine's steps alone")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the simulated nodes are killed")
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun on real nodes
        dist.init_process_group("gloo")
        result = measure(args.sizes_mb, args.calls, args.phases)
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
    call = [None, "hierarchical:measure", [args.sizes_mb, args.calls, args.phases]]
    run = run_on_nodes([call], nodes=2, procs_per_node=2, timeout_s=args.timeout,
                       env={"PYTHONPATH": str(Path(__file__).resolve().parent)})  # fmt: skip
    print(table(run.values(0)[0], "2 simulated nodes x 2 (torchrun, c10d rendezvous)"))


if __name__ == "__main__":
    main()

"""Forward+backward step time of a transformer-sized MLP and attention block.

One run, one table: neuronx_distributed at TP=2 on 2 processes (each comm engine
available), PyTorch's own tensor parallelism (parallelize_module with
ColwiseParallel/RowwiseParallel over DTensor) at TP=2 on the same 2 processes and
the same gloo backend, and TP=1 in one process with 1 and with 2 threads.

    python benchmarks/tp_layers.py [--hidden 768] [--batch 2] [--seq 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """BERT self-attention with `heads` local heads: Q, K, V projections, then the output projection."""

    def __init__(self, query, key, value, output, heads: int, head_dim: int):
        super().__init__()
        self.query, self.key, self.value, self.output = query, key, value, output
        self.heads, self.head_dim = heads, head_dim

    def forward(self, x):
        def split(t):
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
        return self.output(context)


def build_block(kind: str, impl: str, hidden: int, heads: int, tp: int) -> nn.Module:
    """The block with torch.nn layers (`torch`) or neuronx_distributed's TP layers (`nxd`)."""
    from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear

    def column(i, o):
        return ColumnParallelLinear(i, o, gather_output=False) if impl == "nxd" else nn.Linear(i, o)

    def row(i, o):
        return RowParallelLinear(i, o, input_is_parallel=True) if impl == "nxd" else nn.Linear(i, o)

    if kind == "mlp":
        return MLP(column(hidden, 4 * hidden), row(4 * hidden, hidden))
    return Attention(column(hidden, hidden), column(hidden, hidden), column(hidden, hidden), row(hidden, hidden), heads // tp, hidden // heads)


def time_steps(model: nn.Module, x: torch.Tensor, steps: int, sync=lambda: None) -> float:
    """Median seconds of forward + backward over `steps` steps, after 3 warm-up steps."""
    times = []
    for step in range(steps + 3):
        sync()
        start = time.perf_counter()
        model(x).sum().backward()
        sync()
        if step >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _torch_tp(kind: str, model: nn.Module, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if kind == "mlp":
        plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    else:
        plan = {"query": ColwiseParallel(), "key": ColwiseParallel(), "value": ColwiseParallel(), "output": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


def _tp_worker(rank: int, world: int, store: str, args, engines: list[str], results):
    from torch.distributed.device_mesh import init_device_mesh

    from neuronx_distributed import parallel_state

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world)
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(0))
    barrier = dist.barrier
    for kind in ("mlp", "attention"):
        torch.manual_seed(0)
        model = build_block(kind, "nxd", args.hidden, args.heads, world)
        for engine in engines:
            os.environ["NXD_COMM_BACKEND"] = engine
            seconds = time_steps(model, x, args.steps, barrier)
            if rank == 0:
                results[(kind, f"neuronx_distributed TP={world} ({engine} engine)")] = seconds
        torch.manual_seed(0)
        reference = build_block(kind, "torch", args.hidden, args.heads, world)
        seconds = time_steps(_torch_tp(kind, reference, mesh), x, args.steps, barrier)
        if rank == 0:
            results[(kind, f"torch parallelize_module TP={world} (gloo)")] = seconds
    dist.destroy_process_group()


def available_engines() -> list[str]:
    from neuronx_distributed import comm

    return ["torch", "shm"] if comm.shm_engine_available() else ["torch"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    results = {}
    x = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(0))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for kind in ("mlp", "attention"):
            torch.manual_seed(0)
            results[(kind, f"TP=1, one process, {threads} thread{'s' * (threads > 1)}")] = time_steps(
                build_block(kind, "torch", args.hidden, args.heads, 1), x, args.steps
            )

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_tp_worker, args=(2, os.path.join(tmp, "store"), args, available_engines(), shared), nprocs=2)
        results.update(shared)

    print(
        f"\nforward+backward step, hidden={args.hidden}, heads={args.heads}, ffn={4 * args.hidden}, "
        f"batch={args.batch}, seq={args.seq}, median of {args.steps} steps, fp32, {os.cpu_count()} cores\n"
    )
    baseline = {kind: results[(kind, "TP=1, one process, 1 thread")] for kind in ("mlp", "attention")}
    labels = sorted({label for _, label in results}, key=lambda label: (not label.startswith("TP=1"), label))
    print(f"| {'implementation':<48} | {'MLP ms':>8} | {'vs TP=1/1t':>10} | {'attention ms':>12} | {'vs TP=1/1t':>10} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 12}|{'-' * 14}|{'-' * 12}|")
    for label in labels:
        mlp, attention = results[("mlp", label)], results[("attention", label)]
        print(
            f"| {label:<48} | {mlp * 1e3:>8.1f} | {baseline['mlp'] / mlp:>9.2f}x | "
            f"{attention * 1e3:>12.1f} | {baseline['attention'] / attention:>9.2f}x |"
        )


if __name__ == "__main__":
    main()

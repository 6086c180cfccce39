"""ZeRO-1 at DP=2: optimizer-state bytes per rank and step time, ours next to PyTorch's and plain AdamW.

    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/zero1.py [--layers 16 --width 2048 --steps 5]

The model is a stack of `--layers` Linear(width, width) layers (the default is 67M fp32
parameters, 268 MB), trained on random data with AdamW. Variants, in the same run:

  - plain AdamW: every rank holds the whole optimizer state; gradients averaged with
    `parallel_layers.all_reduce_gradients` (bucketed all-reduce), then clip_grad_norm.
  - nxd ZeRO-1: `optimizer.NeuronZero1Optimizer(params, torch.optim.AdamW)` (clipping
    on, max_norm=1.0): reduce-scatter, global norm and clip, AdamW on 1/DP, all-gather.
  - torch ZeRO: `torch.distributed.optim.ZeroRedundancyOptimizer(params, AdamW)`, with
    the gradients all-reduced first (it does not reduce them itself) and no clipping.

All run over gloo (ours with NXD_COMM_BACKEND=torch); the nxd rows are repeated with our
shared-memory engine (`shm`). "Optimizer state" is the bytes of every tensor the optimizer
holds per rank beyond the model's parameters and gradients (moments, step counters, and our
master chunks where a chunk cannot alias its parameter), each storage counted once. Step
time is the median (and min) over --steps full steps (forward, backward, gradient exchange,
optimizer step, parameter exchange) after --warmup, between barriers, as rank 0 sees it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.optimizer import NeuronZero1Optimizer
from neuronx_distributed.parallel_layers import all_reduce_gradients

MIB = 2**20
BATCH = 8


def build_model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers)])


def tensor_storages(value, found: dict) -> None:
    """Collect every tensor storage reachable in a nested container, keyed by its address."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    elif isinstance(value, dict):
        for item in value.values():
            tensor_storages(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            tensor_storages(item, found)


def optimizer_state_bytes(model: nn.Module, optimizer) -> int:
    """Bytes the optimizer holds beyond the model's own parameters (and gradients)."""
    found: dict[int, int] = {}
    if isinstance(optimizer, NeuronZero1Optimizer):
        tensor_storages(dict(optimizer.base_optimizer.state), found)
        tensor_storages([p for g in optimizer.base_optimizer.param_groups for p in g["params"]], found)
    elif isinstance(optimizer, ZeroRedundancyOptimizer):
        tensor_storages(dict(optimizer.optim.state), found)
    else:
        tensor_storages(dict(optimizer.state), found)
    owned_by_model = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(nbytes for ptr, nbytes in found.items() if ptr not in owned_by_model)


def make_step(variant: str, model: nn.Module):
    """(optimizer, step function) for one variant."""
    params = list(model.parameters())
    group = parallel_state.get_data_parallel_group()
    if variant == "plain":
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            all_reduce_gradients(params, group=group)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

    elif variant == "nxd":
        optimizer = NeuronZero1Optimizer(params, torch.optim.AdamW, lr=1e-4)
        step = optimizer.step
    else:
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=group, lr=1e-4)

        def step():
            all_reduce_gradients(params, group=group)
            optimizer.step()

    return optimizer, step


def measure(variant: str, engine: str, args) -> tuple[float, float, float]:
    """(optimizer-state MiB, median step s, min step s) for one variant on one engine."""
    os.environ[comm.BACKEND_ENV] = engine
    model = build_model(args.layers, args.width)
    optimizer, step = make_step(variant, model)
    generator = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(BATCH, args.width, generator=generator)
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        step()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    state = optimizer_state_bytes(model, optimizer) / MIB
    del optimizer, model
    return state, statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    dp = parallel_state.get_data_parallel_size()
    params = sum(p.numel() for p in build_model(args.layers, args.width).parameters())
    rows = []
    for variant, engine, label in [
        ("plain", "torch", "plain AdamW + all-reduce (gloo)"),
        ("nxd", "torch", "nxd ZeRO-1 (gloo)"),
        ("torch", "torch", "torch ZeroRedundancyOptimizer (gloo)"),
        ("plain", "shm", "plain AdamW + all-reduce (shm)"),
        ("nxd", "shm", "nxd ZeRO-1 (shm)"),
    ]:
        state, median, fastest = measure(variant, engine, args)
        rows.append((label, state, median, fastest))
    if dist.get_rank() == 0:
        plain_state = rows[0][1]
        print(f"\n{params / 1e6:.1f}M fp32 parameters ({params * 4 / MIB:.0f} MiB), DP={dp}, {args.steps} steps\n")
        print(f"| variant | optimizer state per rank (MiB) | vs plain | step median (s) | step min (s) |")
        print("|---|---:|---:|---:|---:|")
        for label, state, median, fastest in rows:
            print(f"| {label} | {state:.1f} | {state / plain_state:.3f} | {median:.3f} | {fastest:.3f} |")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Sequence parallelism at TP=2: activation memory per rank and step time, ours next to PyTorch's.

    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/sequence_parallel.py [--steps 10]

One block, LayerNorm -> Linear(h, ffn) -> GELU -> Linear(ffn, h) -> dropout, on
activations `[seq, batch, hidden]`, at two sizes: BERT-base (768/3072, seq 512,
batch 2) and Llama-7B's widths (4096/11008) with a short sequence. Variants:

  - nxd TP: ColumnParallelLinear(gather_output=False) / RowParallelLinear(input_is_parallel=True);
    the norm and dropout see the whole sequence on every rank.
  - nxd SP: the same layers with sequence_parallel_enabled=True and the norm of
    parallel_layers.layer_norm; the norm and dropout see 1/TP of the sequence (the
    dropout forks the TP RNG tracker: each rank holds other tokens), and the step
    includes grads.allreduce_sequence_parallel_gradients.
  - torch TP / torch SP: torch.distributed.tensor.parallel.parallelize_module with
    ColwiseParallel/RowwiseParallel, plus SequenceParallel(sequence_dim=0) on the
    norm and ColwiseParallel(input_layouts=Shard(0)) / RowwiseParallel(output_layouts=Shard(0))
    for SP; its dropout runs on the local sequence shard, and the step reduces the
    norm's Partial gradients to Replicate (what our step's SP gradient all-reduce does).

Both libraries run over gloo (ours with NXD_COMM_BACKEND=torch); the nxd rows are
repeated with our shared-memory engine (`shm`). "Saved" is the activation memory
held for backward per rank: the bytes of every tensor autograd saves during the
forward (torch.autograd.graph.saved_tensors_hooks), each storage counted once,
parameters left out; "norm+dropout" is the part saved inside those two modules.
Step time is the median (and min) over --steps forward+backward steps after
--warmup, between barriers, as rank 0 sees it. No RSS numbers: the allocator's
caching makes them say little about one block.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear
from neuronx_distributed.parallel_layers.grads import allreduce_sequence_parallel_gradients
from neuronx_distributed.parallel_layers.layer_norm import LayerNorm
from neuronx_distributed.parallel_layers.random import get_rng_state_tracker, model_parallel_manual_seed

SIZES = {  # name: (hidden, ffn, seq, batch)
    "bert-base": (768, 3072, 512, 2),
    "llama-7b widths": (4096, 11008, 128, 1),
}
DROPOUT = 0.1
REGIONS = ("norm", "fc1", "act", "fc2", "drop")
MIB = 2**20


class ShardedDropout(nn.Dropout):
    """Dropout on activations that differ across the TP group: draws from the rank's own RNG stream."""

    def forward(self, x):
        with get_rng_state_tracker().fork():
            return super().forward(x)


class Block(nn.Module):
    def __init__(self, norm, fc1, fc2, drop):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2, self.drop = norm, fc1, nn.GELU(), fc2, drop

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


def nxd_block(hidden: int, ffn: int, sequence_parallel: bool) -> Block:
    return Block(
        LayerNorm(hidden, sequence_parallel_enabled=sequence_parallel),
        ColumnParallelLinear(hidden, ffn, gather_output=False, sequence_parallel_enabled=sequence_parallel),
        RowParallelLinear(ffn, hidden, input_is_parallel=True, sequence_parallel_enabled=sequence_parallel),
        ShardedDropout(DROPOUT) if sequence_parallel else nn.Dropout(DROPOUT),
    )


def torch_block(hidden: int, ffn: int, sequence_parallel: bool, mesh) -> Block:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    block = Block(nn.LayerNorm(hidden), nn.Linear(hidden, ffn), nn.Linear(ffn, hidden), nn.Dropout(DROPOUT))
    if sequence_parallel:
        plan = {
            "norm": SequenceParallel(sequence_dim=0),
            "fc1": ColwiseParallel(input_layouts=Shard(0)),
            "fc2": RowwiseParallel(output_layouts=Shard(0)),
        }
    else:
        plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    return parallelize_module(block, mesh, plan)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding `tensor`'s data on this rank (unwrapping DTensor and pending collectives)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        with torch.no_grad():
            tensor = tensor.to_local()
    if isinstance(tensor, AsyncCollectiveTensor):
        tensor = tensor.elem
    return tensor


class SavedActivations:
    """Bytes autograd saves for backward, by the block's child module that was running; parameters excluded."""

    def __init__(self, block: Block):
        self.block = block
        self.region = None
        self.bytes = dict.fromkeys(REGIONS, 0)
        self._seen = {_local(p).untyped_storage().data_ptr() for p in block.parameters()}
        self._handles = [
            getattr(block, name).register_forward_pre_hook(lambda module, args, name=name: self._enter(name))
            for name in REGIONS
        ]

    def _enter(self, name: str) -> None:
        self.region = name

    def pack(self, tensor):
        storage = _local(tensor).untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes[self.region] += storage.nbytes()
        return tensor

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def nxd_reduce_grads(block: Block):
    """Our step's gradient reduction: the sequence-parallel (norm, Row bias) grads summed over the TP group."""
    optimizer = torch.optim.SGD(block.parameters(), lr=0.0)  # only holds the parameters
    return lambda: allreduce_sequence_parallel_gradients(optimizer)


def torch_reduce_grads(block: Block):
    """DTensor leaves the norm's grads Partial (one partial sum per rank); reduce them as our step does."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    def reduce():
        for param in block.parameters():
            if isinstance(param.grad, DTensor) and any(isinstance(p, Partial) for p in param.grad.placements):
                param.grad = param.grad.redistribute(placements=[Replicate()] * len(param.grad.placements))

    return reduce


def measure(block: Block, x: torch.Tensor, grad: torch.Tensor, steps: int, warmup: int, reduce_grads):
    """(saved bytes by region, step times in seconds) of forward+backward on `block`."""
    saved = SavedActivations(block)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        out = block(x)
    saved.close()
    out.backward(grad)
    times = []
    for step in range(warmup + steps):
        block.zero_grad(set_to_none=True)
        dist.barrier()
        started = time.perf_counter()
        block(x).backward(grad)
        reduce_grads()
        dist.barrier()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return saved.bytes, times


def run_variant(library: str, sequence_parallel: bool, engine: str, size: str, args, mesh):
    hidden, ffn, seq, batch = SIZES[size]
    tp, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    os.environ[comm.BACKEND_ENV] = engine
    model_parallel_manual_seed(1234)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(seq, batch, hidden, generator=generator)
    grad = torch.randn(seq, batch, hidden, generator=generator)
    if sequence_parallel:  # this rank's chunk of the sequence, in and out
        x, grad = x.chunk(tp)[tp_rank].clone(), grad.chunk(tp)[tp_rank].clone()  # own storage: counted at its size
    if library == "nxd":
        block = nxd_block(hidden, ffn, sequence_parallel)
        reduce_grads = nxd_reduce_grads(block)
    else:
        block = torch_block(hidden, ffn, sequence_parallel, mesh)
        reduce_grads = torch_reduce_grads(block)
    saved, times = measure(block, x.requires_grad_(), grad, args.steps, args.warmup, reduce_grads)
    return dict(
        size=size,
        variant=f"{library} {'SP' if sequence_parallel else 'TP'}",
        comm="gloo" if engine == "torch" else engine,
        saved_mib=sum(saved.values()) / MIB,
        norm_dropout_mib=(saved["norm"] + saved["drop"]) / MIB,
        median_ms=statistics.median(times) * 1e3,
        min_ms=min(times) * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    args = parser.parse_args()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ.get("WORLD_SIZE", "1")))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    variants = [
        ("nxd", False, "torch"),
        ("nxd", True, "torch"),
        ("torch", False, "torch"),
        ("torch", True, "torch"),
        ("nxd", False, "shm"),
        ("nxd", True, "shm"),
    ]
    rows = [run_variant(*variant, size, args, mesh) for size in args.sizes for variant in variants]
    if dist.get_rank() == 0:
        print(
            f"TP={dist.get_world_size()} on {dist.get_world_size()} CPU processes, fp32, dropout {DROPOUT}, "
            f"{args.steps} steps after {args.warmup} warm-up"
        )
        header = f"{'block':<16} {'variant':<9} {'comm':<5} {'saved MiB':>10} {'norm+dropout MiB':>17} {'median ms':>10} {'min ms':>8}"
        print(header)
        print("-" * len(header))
        for row in rows:
            print(
                f"{row['size']:<16} {row['variant']:<9} {row['comm']:<5} {row['saved_mib']:>10.1f} "
                f"{row['norm_dropout_mib']:>17.2f} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f}"
            )
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

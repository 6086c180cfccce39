"""ZeRO-1 on a Llama-1B-shaped model at TP=2 x DP=2 and TP=1 x DP=4: bytes per rank and step time, ours vs PyTorch's vs plain AdamW.

    .venv/bin/torchrun --standalone --nproc_per_node=4 benchmarks/zero1.py
    .venv/bin/torchrun --standalone --nproc_per_node=4 benchmarks/zero1.py --layers 1 --hidden 512 \
        --intermediate 1408 --heads 8 --kv-heads 2 --vocab 4096 --seq 64 --steps 3   # small, for a busy machine

The model has TinyLlama-1.1B's layer shape (hidden 2048, intermediate 5632, 32 heads,
4 KV heads, SwiGLU MLP, RMSNorm), scaled to fit one host: by default 2 layers and a
16384-word vocabulary (155M fp32 parameters). It is built from our TP layers
(ParallelEmbedding, Column/RowParallelLinear, vocabulary-parallel loss) and trained on
random tokens, `--batch` sequences of `--seq` tokens per DP rank. Both topologies run in
the same launch, one after the other, each with these variants:

  - plain AdamW: every rank holds the whole optimizer state of its TP shard; gradients
    averaged over DP with `parallel_layers.all_reduce_gradients`, then the TP-aware
    `parallel_layers.clip_grad_norm(max_norm=1.0)`, then AdamW.
  - nxd ZeRO-1: `optimizer.NeuronZero1Optimizer(params, torch.optim.AdamW)` (clipping on,
    max_norm=1.0): reduce-scatter, global norm and clip, AdamW on 1/DP, all-gather.
  - torch ZeRO: `torch.distributed.optim.ZeroRedundancyOptimizer(params, AdamW,
    process_group=<DP group>)`, after the same gradient average and clipping as plain (it
    neither averages nor clips by itself).

All three run over gloo (ours with NXD_COMM_BACKEND=torch); plain and nxd ZeRO-1 are
repeated on our shared-memory engine (`shm`). "Optimizer" bytes are every tensor the
optimizer holds beyond the model's parameters and gradients (moments, step counters, our
reduced gradient chunks and master chunks where a chunk cannot alias its parameter), each
storage counted once; "total" adds the parameters and gradients; both the largest over the
ranks. Step time is the median (and min) over --steps full steps (forward, backward,
gradient exchange, clipping, optimizer step, parameter exchange) after --warmup, between
barriers, as rank 0 sees it; with --rounds N the variants run in turn N times and each
row pools the steps of its rounds. On a loaded machine, run it at real-time priority with
a watchdog above it, e.g. `chrt -f 2 timeout 900 chrt -r 1 .venv/bin/torchrun ...`
(round-robin, not FIFO: 4 FIFO ranks on 2 cores can starve each other for good). The targets (issue 14): nxd optimizer bytes <= 1.05 / DP of
plain's, nxd step time <= 1.10x plain's and <= torch ZeRO's on the same engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.optimizer import NeuronZero1Optimizer
from neuronx_distributed.parallel_layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    all_reduce_gradients,
    clip_grad_norm,
)
from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy
from neuronx_distributed.parallel_layers.utils import is_tensor_parallel

MIB = 2**20
TOPOLOGIES = (2, 1)  # tensor-parallel sizes; DP is the rest of the 4 ranks


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


class Block(nn.Module):
    """A Llama decoder layer: grouped-query causal attention and a SwiGLU MLP, heads split across TP."""

    def __init__(self, args):
        super().__init__()
        self.head_dim = args.hidden // args.heads
        kv = args.kv_heads * self.head_dim
        column = dict(bias=False, gather_output=False)
        self.attention_norm = nn.Parameter(torch.ones(args.hidden))
        self.q = ColumnParallelLinear(args.hidden, args.hidden, **column)
        self.k = ColumnParallelLinear(args.hidden, kv, **column)
        self.v = ColumnParallelLinear(args.hidden, kv, **column)
        self.o = RowParallelLinear(args.hidden, args.hidden, bias=False, input_is_parallel=True)
        self.mlp_norm = nn.Parameter(torch.ones(args.hidden))
        self.gate = ColumnParallelLinear(args.hidden, args.intermediate, **column)
        self.up = ColumnParallelLinear(args.hidden, args.intermediate, **column)
        self.down = RowParallelLinear(args.intermediate, args.hidden, bias=False, input_is_parallel=True)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.attention_norm)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        x = x + self.o(attention)
        h = rms_norm(x, self.mlp_norm)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaShaped(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.embed = ParallelEmbedding(args.vocab, args.hidden)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.layers))
        self.norm = nn.Parameter(torch.ones(args.hidden))
        self.lm_head = ColumnParallelLinear(args.hidden, args.vocab, bias=False, gather_output=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1])
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(rms_norm(x, self.norm))
        return parallel_cross_entropy(logits, tokens[:, 1:]).mean()


def build_model(args) -> nn.Module:
    torch.manual_seed(0)  # the same replicated weights on every rank
    return LlamaShaped(args)


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


def bytes_held(model: nn.Module, optimizer) -> tuple[int, int]:
    """(bytes the optimizer holds beyond the model's parameters and gradients, total with them)."""
    model_found: dict[int, int] = {}
    tensor_storages([p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None], model_found)
    found: dict[int, int] = {}
    if isinstance(optimizer, NeuronZero1Optimizer):
        masters = [p for g in optimizer.base_optimizer.param_groups for p in g["params"]]
        tensor_storages([dict(optimizer.base_optimizer.state), masters, [m.grad for m in masters if m.grad is not None]], found)
    elif isinstance(optimizer, ZeroRedundancyOptimizer):
        tensor_storages(dict(optimizer.optim.state), found)
    else:
        tensor_storages(dict(optimizer.state), found)
    optimizer_only = sum(nbytes for ptr, nbytes in found.items() if ptr not in model_found)
    return optimizer_only, optimizer_only + sum(model_found.values())


def make_step(variant: str, model: nn.Module):
    """(optimizer, step function) for one variant."""
    params = list(model.parameters())
    group = parallel_state.get_data_parallel_group()
    if variant == "nxd":
        optimizer = NeuronZero1Optimizer(params, torch.optim.AdamW, lr=1e-4)
        return optimizer, optimizer.step
    if variant == "plain":
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, process_group=group, lr=1e-4)

    def step():
        all_reduce_gradients(params, group=group)
        clip_grad_norm(params, 1.0)
        optimizer.step()

    return optimizer, step


@dataclass
class Row:
    label: str
    engine: str
    optimizer_bytes: int
    total_bytes: int
    median: float
    fastest: float


def measure(variant: str, engine: str, label: str, args) -> tuple[Row, list[float]]:
    """One variant's row and its timed steps."""
    comm.set_backend(engine)  # sets the groups up again on this engine (an environment variable would not)
    model = build_model(args)
    optimizer, step = make_step(variant, model)
    generator = torch.Generator().manual_seed(parallel_state.get_data_parallel_rank())
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(tokens).backward()
        step()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    held = torch.tensor(bytes_held(model, optimizer), dtype=torch.float64)
    dist.all_reduce(held, op=dist.ReduceOp.MAX)
    del optimizer, model
    return Row(label, engine, int(held[0]), int(held[1]), statistics.median(times), min(times)), times


def measure_rounds(variants: list[tuple[str, str, str]], args) -> list[Row]:
    """Every variant in turn, `args.rounds` times; each row's median and min over the steps of all its rounds."""
    rows, times = {}, {}
    for _ in range(args.rounds):
        for variant, engine, label in variants:
            row, steps = measure(variant, engine, label, args)
            rows.setdefault((label, engine), row)
            times.setdefault((label, engine), []).extend(steps)
    for key, row in rows.items():
        row.median, row.fastest = statistics.median(times[key]), min(times[key])
    return list(rows.values())


def report(rows: list[Row], tp: int, dp: int, params: int) -> None:
    """Print one topology's table and, per engine, nxd ZeRO-1 against the targets."""
    print(f"\nTP={tp} x DP={dp}: {params / 1e6:.1f}M fp32 parameters in all ({params * 4 / MIB:.0f} MiB)\n")
    print("| variant | engine | optimizer MiB/rank | vs plain | total MiB/rank | step median (s) | step min (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    plain = {row.engine: row for row in rows if row.label == "plain AdamW"}
    for row in rows:
        print(f"| {row.label} | {row.engine} | {row.optimizer_bytes / MIB:.1f} "
              f"| {row.optimizer_bytes / plain[row.engine].optimizer_bytes:.3f} | {row.total_bytes / MIB:.1f} "
              f"| {row.median:.3f} | {row.fastest:.3f} |")
    for engine, base in plain.items():
        ours = next(row for row in rows if row.label == "nxd ZeRO-1" and row.engine == engine)
        checks = [f"optimizer bytes vs plain {ours.optimizer_bytes / base.optimizer_bytes:.3f} (target <= {1.05 / dp:.3f})",
                  f"step vs plain {ours.median / base.median:.2f}x (<= 1.10)"]
        theirs = next((row for row in rows if row.label == "torch ZeRO" and row.engine == engine), None)
        if theirs is not None:
            checks.append(f"step vs torch ZeRO {ours.median / theirs.median:.2f}x (<= 1.00)")
        print(f"nxd ZeRO-1 targets ({engine}): " + "; ".join(checks))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="sequences per DP rank")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variants in turn this many times (interleaved, against load drift)")
    args = parser.parse_args()
    if os.environ.get(comm.BACKEND_ENV, "").strip():
        raise SystemExit(f"unset {comm.BACKEND_ENV}: it would override the engine each row names")
    dist.init_process_group("gloo")
    if dist.get_world_size() != 4:
        raise SystemExit("run with --nproc_per_node=4 (TP=2 x DP=2 and TP=1 x DP=4)")
    torch.set_num_threads(max(1, (os.cpu_count() or 4) // dist.get_world_size()))
    variants = [("plain", "torch", "plain AdamW"), ("nxd", "torch", "nxd ZeRO-1"), ("torch", "torch", "torch ZeRO"),
                ("plain", "shm", "plain AdamW"), ("nxd", "shm", "nxd ZeRO-1")]
    for tp in TOPOLOGIES:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        # Shards summed over the TP group, replicated parameters counted once.
        local = sum(p.numel() * (1 if is_tensor_parallel(p) else 1 / tp) for p in build_model(args).parameters())
        params = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(params, group=parallel_state.get_tensor_model_parallel_group())
        rows = measure_rounds(variants, args)
        if dist.get_rank() == 0:
            report(rows, tp, parallel_state.get_data_parallel_size(), int(params))
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

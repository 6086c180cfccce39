"""Our TP layers against plain PyTorch on a GPU: forward+backward time in bf16 at Llama-3-8B layer sizes.

TP=1, one process: ColumnParallelLinear (hidden -> intermediate), RowParallelLinear
(intermediate -> hidden), ParallelEmbedding (vocab x hidden) and the LM head
(ColumnParallelLinear hidden -> vocab) against nn.Linear / nn.Embedding of the same
shapes; the target is at most 3% overhead. With two or more GPUs, also the Llama MLP
(gate and up Column, SiLU, down Row) at TP=2 under torchrun on NCCL against PyTorch's
`parallelize_module` (ColwiseParallel / RowwiseParallel) of the same MLP.

Times are CUDA-event medians over `--steps` steps after `--warmup` steps, the two
implementations alternating step by step so that clock changes hit both alike.
Without CUDA it prints one line and exits 0; `--device cpu` runs the same code at
small sizes on CPU (wall-clock timers, TP=2 over gloo) to check it without a GPU.

    python benchmarks/gpu_layers.py [--tokens 8192] [--steps 20] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LLAMA_8B = dict(hidden=4096, intermediate=14336, vocab=128256)
SMALL = dict(hidden=256, intermediate=512, vocab=1024)  # --device cpu


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with the given projection layers."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Timer:
    """Per-step seconds on `device`: CUDA events on a GPU, wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step) -> float:
        if not self.cuda:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def fwd_bwd(layer: nn.Module, inputs: torch.Tensor, grad: torch.Tensor):
    """One forward+backward step of `layer` (gradients accumulate; their sum is not read)."""

    def step():
        layer(inputs).backward(grad)

    return step


def race(steps: dict[str, object], timer: Timer, warmup: int, timed: int) -> dict[str, float]:
    """Median seconds of each step function, run in alternation."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(timed):
        for name, step in steps.items():
            times[name].append(timer(step))
    return {name: statistics.median(values) for name, values in times.items()}


def tp1_rows(sizes: dict, tokens: int, device: torch.device, warmup: int, timed: int) -> list[tuple]:
    from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

    hidden, intermediate, vocab = sizes["hidden"], sizes["intermediate"], sizes["vocab"]
    options = dict(dtype=torch.bfloat16, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def activations(width):
        return torch.randn(tokens, width, generator=generator, **options).requires_grad_()

    cases = {
        f"Column {hidden}->{intermediate}": (
            ColumnParallelLinear(hidden, intermediate, bias=False, gather_output=False, **options),
            nn.Linear(hidden, intermediate, bias=False, **options), activations(hidden), intermediate),
        f"Row {intermediate}->{hidden}": (
            RowParallelLinear(intermediate, hidden, bias=False, input_is_parallel=True, **options),
            nn.Linear(intermediate, hidden, bias=False, **options), activations(intermediate), hidden),
        f"Embedding {vocab}x{hidden}": (
            ParallelEmbedding(vocab, hidden, **options), nn.Embedding(vocab, hidden, **options),
            torch.randint(0, vocab, (tokens,), generator=generator, device=device), hidden),
        f"LM head {hidden}->{vocab}": (
            ColumnParallelLinear(hidden, vocab, bias=False, gather_output=False, **options),
            nn.Linear(hidden, vocab, bias=False, **options), activations(hidden), vocab),
    }
    rows = []
    timer = Timer(device)
    for name, (ours, reference, inputs, out_width) in cases.items():
        grad = torch.randn(tokens, out_width, generator=generator, **options)
        result = race({"ours": fwd_bwd(ours, inputs, grad), "torch": fwd_bwd(reference, inputs, grad)}, timer, warmup, timed)
        rows.append((name, "nn.Linear" if "Embedding" not in name else "nn.Embedding", result["ours"], result["torch"]))
        del ours, reference, inputs, grad
    return rows


def tp2_worker(args) -> None:
    """Run under torchrun with 2 ranks: our TP=2 MLP vs parallelize_module's; rank 0 prints its rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from neuronx_distributed import parallel_state
    from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear

    device = torch.device(args.device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)  # NCCL on CUDA, gloo on CPU
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    sizes, options = (LLAMA_8B if device.type == "cuda" else SMALL), dict(dtype=torch.bfloat16, device=device)
    hidden, intermediate = sizes["hidden"], sizes["intermediate"]
    ours = LlamaMLP(ColumnParallelLinear(hidden, intermediate, bias=False, gather_output=False, **options),
                    ColumnParallelLinear(hidden, intermediate, bias=False, gather_output=False, **options),
                    RowParallelLinear(intermediate, hidden, bias=False, input_is_parallel=True, **options))
    plain = LlamaMLP(*(nn.Linear(i, o, bias=False, **options) for i, o in
                       [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]))
    mesh = init_device_mesh(device.type, (2,))
    theirs = parallelize_module(plain, mesh, {"gate": ColwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel()})
    generator = torch.Generator(device=device).manual_seed(0)  # the same input on both ranks
    inputs = torch.randn(args.tokens, hidden, generator=generator, **options).requires_grad_()
    grad = torch.randn(args.tokens, hidden, generator=generator, **options)
    steps = {"ours": fwd_bwd(ours, inputs, grad), "torch": fwd_bwd(theirs, inputs, grad)}
    result = race(steps, Timer(device), args.warmup, args.steps)
    times = torch.tensor([result["ours"], result["torch"]], device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    if dist.get_rank() == 0:
        backend = dist.get_backend()
        print(f"ROW\tLlama MLP TP=2 ({backend})\tparallelize_module TP=2 ({backend})\t{times[0].item()}\t{times[1].item()}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def tp2_rows(args) -> list[tuple]:
    """The TP=2 rows from a torchrun of this script with 2 ranks (one GPU each on CUDA)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--tp2-worker", "--device", args.device, "--tokens", str(args.tokens), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    rows = [line.split("\t")[1:] for line in done.stdout.splitlines() if line.startswith("ROW\t")]
    if done.returncode != 0 or not rows:
        raise RuntimeError(f"the TP=2 torchrun failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return [(ours, theirs, float(a), float(b)) for ours, theirs, a, b in rows]


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n")
    print(f"| {'ours':<32} | {'against':<34} | {'ours ms':>9} | {'torch ms':>9} | {'overhead':>8} |")
    print(f"|{'-' * 34}|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for ours, theirs, ours_s, theirs_s in rows:
        print(f"| {ours:<32} | {theirs:<34} | {ours_s * 1e3:>9.3f} | {theirs_s * 1e3:>9.3f} | {ours_s / theirs_s - 1:>+8.1%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tokens", type=int, default=None, help="batch x sequence (default 8192 on CUDA, 64 on CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tp2-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tokens = args.tokens or (8192 if args.device == "cuda" else 64)
    if args.tp2_worker:
        tp2_worker(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_layers: no CUDA device (torch {torch.__version__}); nothing measured (--device cpu checks the code)")
        return

    from neuronx_distributed import parallel_state

    device = torch.device(args.device)
    sizes = LLAMA_8B if device.type == "cuda" else SMALL
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    title = (f"forward+backward, TP=1, bf16, {args.tokens} tokens, hidden={sizes['hidden']}, "
             f"intermediate={sizes['intermediate']}, vocab={sizes['vocab']}; median of {args.steps} steps after "
             f"{args.warmup} warm-up, alternating; {name}, torch {torch.__version__} (target: overhead <= 3%)")
    print_table(title, tp1_rows(sizes, args.tokens, device, args.warmup, args.steps))
    parallel_state.destroy_model_parallel()

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        print(f"\nTP=2 MLP vs parallelize_module: skipped, {gpus} GPU (NCCL needs one per rank)")
        return
    print_table(f"Llama MLP forward+backward at TP=2 (torchrun, 2 ranks), bf16, {args.tokens} tokens, "
                f"hidden={sizes['hidden']}, intermediate={sizes['intermediate']}", tp2_rows(args))


if __name__ == "__main__":
    main()

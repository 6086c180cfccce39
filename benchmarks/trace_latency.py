"""Per-call latency of traced tensor-parallel inference: MiniLM (all-MiniLM-L6-v2), sequence 128.

One run, one table, at batch 1 and 8:
  untraced  the Hugging Face model in this process, all cores
  eager     the tutorial's TP=2 model called inside its 2 worker processes (1 call = both ranks)
  exported  the same workers running the torch.export program of their shard as a traced worker runs it
  traced    TensorParallelModel from parallel_model_trace(tp_degree=2), called from this process
Dispatch overhead = traced - exported: the caller's share (inputs into shared memory, waking the
workers, waiting, copying rank 0's outputs back). A tiny ColumnParallelLinear (8 -> 16, no
collective) shows it with almost no compute. Times are medians over the calls; the last line
gives the tiny model's fastest calls too (the floor when no other process competes for the cores).

    HF_HUB_OFFLINE=1 python benchmarks/trace_latency.py [--calls 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "inference"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

SEQ = 128
TP = 2
WARMUP = 5


def call_times_ms(call, calls: int, before_each=lambda: None) -> list[float]:
    with torch.inference_mode():
        for _ in range(WARMUP):
            before_each()
            call()
        times = []
        for _ in range(calls):
            before_each()
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def build_tiny_layer():
    from neuronx_distributed.parallel_layers import ColumnParallelLinear

    torch.manual_seed(0)
    return ColumnParallelLinear(8, 16, gather_output=False)


def _eager_worker(rank: int, store_path: str, build, inputs: tuple, calls: int, results) -> None:
    """In each of the TP ranks: time the eager shard, then its exported program; rank 0 reports."""
    from neuronx_distributed import parallel_state
    from neuronx_distributed.trace.program_runner import program_runner

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // TP))
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=TP)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    model = build().eval()
    barrier = partial(dist.barrier)
    eager = call_times_ms(lambda: model(*inputs), calls, barrier)
    with torch.no_grad():
        program, _ = program_runner(torch.export.export(model, inputs, strict=False))
    exported = call_times_ms(lambda: program(*inputs), calls, barrier)
    if rank == 0:
        results.put((eager, exported))
    dist.destroy_process_group()


def eager_and_exported_ms(build, inputs: tuple, calls: int) -> tuple[list[float], list[float]]:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_eager_worker, args=(os.path.join(tmp, "store"), build, inputs, calls, results),
                           nprocs=TP, start_method="spawn")
    return results.get()


def traced_ms(build, inputs: tuple, calls: int) -> list[float]:
    from neuronx_distributed.trace import parallel_model_trace

    with parallel_model_trace(build, inputs, tp_degree=TP) as model:
        return call_times_ms(lambda: model(*inputs), calls)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    import tp_inference_minilm as example
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(example.MODEL_DIR)
    reference = AutoModel.from_pretrained(example.MODEL_DIR).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "bert.pt")
        torch.save({"model": reference.state_dict()}, checkpoint)
        build = partial(example.get_model, checkpoint)
        for batch in (1, 8):
            sentences = (example.SENTENCES * batch)[:batch]
            inputs = example.encode(tokenizer, sentences, max_length=SEQ)
            untraced = call_times_ms(lambda: reference(*inputs), args.calls)
            eager, exported = eager_and_exported_ms(build, inputs, args.calls)
            traced = traced_ms(build, inputs, args.calls)
            rows.append((f"MiniLM b={batch} s={SEQ}", *map(statistics.median, (untraced, eager, exported, traced))))
    tiny_inputs = (torch.randn(1, 8),)
    tiny_eager, tiny_exported = eager_and_exported_ms(build_tiny_layer, tiny_inputs, args.calls * 50)
    tiny_traced = traced_ms(build_tiny_layer, tiny_inputs, args.calls * 50)
    tiny = (tiny_eager, tiny_exported, tiny_traced)
    rows.append(("tiny layer (dispatch)", float("nan"), *map(statistics.median, tiny)))

    print(f"\n{os.cpu_count()} CPU cores, torch {torch.__version__}, TP={TP} workers with "
          f"{max(1, (os.cpu_count() or 1) // TP)} thread(s) each, untraced with {torch.get_num_threads()}; ms per call\n")
    header = ["model", "untraced 1 proc", "eager TP=2", "exported TP=2", "traced TP=2", "dispatch overhead"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, untraced, eager, exported, traced in rows:
        cells = [f"{value:.3f}" if value == value else "-" for value in (untraced, eager, exported, traced)]
        print(f"| {name} | " + " | ".join(cells) + f" | {traced - exported:.3f} |")
    fastest = [sorted(times)[: max(1, len(times) // 10)] for times in tiny]
    eager_best, exported_best, traced_best = (statistics.mean(times) for times in fastest)
    print(f"\ntiny layer, mean of the fastest 10% of {len(tiny_traced)} calls: eager {eager_best:.3f}, "
          f"exported {exported_best:.3f}, traced {traced_best:.3f}; dispatch overhead {traced_best - exported_best:.3f} ms")


if __name__ == "__main__":
    main()

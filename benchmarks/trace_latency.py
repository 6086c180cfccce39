"""Per-call latency of traced tensor-parallel inference: MiniLM (all-MiniLM-L6-v2), sequence 128.

Two TP=2 models of the pretrained MiniLM:
  parallelize   `tp_plan.parallelize(model)` with its BERT plan: attention and MLP sharded
                (two all-reduces per layer, one for the vocabulary-parallel embedding)
  tutorial      the inference tutorial's model: the seed's attention swaps plus the MLP as a
                Column and a Row layer (two all-reduces per layer, the embedding replicated)
Columns, ms per call:
  untraced      the Hugging Face model in this process, all cores
  eager         the TP=2 model called inside its 2 worker processes (1 call = both ranks)
  exported      the same workers running the torch.export program of their shard as a traced worker runs it
  traced        TensorParallelModel from parallel_model_trace(tp_degree=2), called from this process
  ratio         traced / untraced (median over rounds of the rounds' medians; then the
                lowest and highest round, which show how much other load moved it)
  dispatch      traced - exported: the caller's share (inputs into shared memory, waking the
                workers, waiting, copying rank 0's outputs back)
Every column is measured in the same rounds: each round runs `--calls` calls of each column in
turn (the first call after a switch is not counted), so load from other processes falls on all
columns alike. A tiny ColumnParallelLinear (8 -> 16, no collective) shows the dispatch with
almost no compute. Each traced model's outputs are checked against the untraced model first.
`--breakdown` then profiles each MiniLM row's forward (untraced, and TP rank 0's exported
program) by operator kind: matmuls, attention, all-reduces, other operators, Python between them,
over the fastest quarter of `4 x --calls` calls (the calls other load disturbed least).

    HF_HUB_OFFLINE=1 python benchmarks/trace_latency.py [--calls 10] [--rounds 5]
        [--models tutorial parallelize parallelize-b8 tiny] [--breakdown]
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

SEQ = 128
TP = 2
COLUMNS = ("untraced", "eager", "exported", "traced")
MODELS = ("tutorial", "parallelize", "parallelize-b8", "tiny")  # rows; "-b8": batch 8 instead of 1

def timed_calls_ms(call, calls: int, before_each=lambda: None) -> list[float]:
    """`calls` timings of `call()` after one untimed call (it absorbs the switch from another column)."""
    with torch.inference_mode():
        before_each()
        call()
        times = []
        for _ in range(calls):
            before_each()
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return times


# Where a forward's time goes: operators by what they do (self time, so a linear's matmul counts once).
CATEGORIES = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention", ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax")),
    ("all-reduces", ("nxd::", "c10d::allreduce")),
)


BREAKDOWN_ROWS = (*[name for name, _ in CATEGORIES], "other ops", "Python between ops", "whole forward")


def op_breakdown_ms(call, calls: int, before_each=lambda: None) -> dict[str, float]:
    """ms per call of each CATEGORIES entry, of everything else, and of the Python between operators
    (torch.profiler self times), averaged over the fastest quarter of `calls` calls.

    The fastest calls are those that other processes disturbed least. An all-reduce's time
    includes waiting for the slower rank to arrive. `before_each` runs outside the calls.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with torch.inference_mode():
        before_each()
        call()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for index in range(calls):
                before_each()
                with record_function(f"forward {index}"):
                    call()
    events = profiler.events()
    forwards = [event for event in events if event.name.startswith("forward ")]
    per_call = []
    for forward in forwards:
        totals = dict.fromkeys(BREAKDOWN_ROWS, 0.0)
        span = forward.time_range
        for event in events:
            inside = event.thread == forward.thread and span.start <= event.time_range.start <= span.end
            if inside and event is not forward and not event.name.startswith(("c10d::barrier", "gloo:barrier")):
                name = next((name for name, prefixes in CATEGORIES if event.name.startswith(prefixes)), "other ops")
                totals[name] += event.self_cpu_time_total / 1e3
        totals["whole forward"] = (span.end - span.start) / 1e3
        totals["Python between ops"] = totals["whole forward"] - sum(totals[name] for name in BREAKDOWN_ROWS[:-2])
        per_call.append(totals)
    fastest = sorted(per_call, key=lambda totals: totals["whole forward"])[: max(1, len(per_call) // 4)]
    return {row: statistics.mean(totals[row] for totals in fastest) for row in BREAKDOWN_ROWS}


def build_tiny_layer():
    from neuronx_distributed.parallel_layers import ColumnParallelLinear

    torch.manual_seed(0)
    return ColumnParallelLinear(8, 16, gather_output=False)


def build_parallelized():
    """The pretrained MiniLM made tensor-parallel by its plan (in each worker)."""
    import tp_inference_minilm as example
    from transformers import AutoModel

    from neuronx_distributed.tp_plan import parallelize

    return parallelize(AutoModel.from_pretrained(example.MODEL_DIR))


def _tp_worker(rank: int, store_path: str, build, inputs: tuple, commands, results) -> None:
    """One TP rank running the eager shard or its exported program when told; rank 0 reports the times."""
    from neuronx_distributed import parallel_state
    from neuronx_distributed.trace.program_runner import program_runner
    from neuronx_distributed.trace.workers import default_threads_per_worker

    torch.set_num_threads(default_threads_per_worker(TP))  # as a traced model's workers run
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=TP)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    model = build().eval()
    with torch.no_grad():
        exported = torch.export.export(model, inputs, strict=False)
    program, _ = program_runner(exported)
    callables = {"eager": lambda: model(*inputs), "exported": lambda: program(*inputs)}
    results.put(("ready", rank))
    while True:
        command, *arguments = commands[rank].get()
        if command == "stop":
            break
        column, calls = command, *arguments
        if column == "breakdown":
            report = op_breakdown_ms(callables["exported"], calls, partial(dist.barrier))
        else:
            report = timed_calls_ms(callables[column], calls, partial(dist.barrier))
        if rank == 0:
            results.put(report)
    dist.destroy_process_group()


class TPWorkers:
    """The eager and exported columns: 2 spawned ranks that run blocks of calls on request."""

    def __init__(self, build, inputs: tuple, tmp: str, tag: str):
        context = mp.get_context("spawn")
        self._commands = [context.SimpleQueue() for _ in range(TP)]
        self._results = context.SimpleQueue()
        self._processes = mp.start_processes(
            _tp_worker, args=(os.path.join(tmp, f"store-{tag}"), build, inputs, self._commands, self._results),
            nprocs=TP, join=False, start_method="spawn")
        for _ in range(TP):
            self._results.get()

    def run(self, column: str, calls: int) -> list[float]:
        for queue in self._commands:
            queue.put((column, calls))
        return self._results.get()

    def stop(self) -> None:
        for queue in self._commands:
            queue.put(("stop",))
        while not self._processes.join():  # returns after each process that ends
            pass


def measure(build, inputs: tuple, untraced, rounds: int, calls: int, tmp: str, tag: str, check=None):
    """Rounds of every column in turn; returns (medians per column, each round's traced/untraced ratio, workers)."""
    from neuronx_distributed.trace import parallel_model_trace

    workers = TPWorkers(build, inputs, tmp, tag)
    times = {column: [] for column in COLUMNS}
    ratios = []
    with parallel_model_trace(build, inputs, tp_degree=TP) as traced:
        if check is not None:
            with torch.inference_mode():
                check(traced(*inputs))
        for _ in range(rounds):
            medians = {}
            for column in COLUMNS:
                if column == "untraced":
                    block = timed_calls_ms(lambda: untraced(*inputs), calls) if untraced else [float("nan")]
                elif column == "traced":
                    block = timed_calls_ms(lambda: traced(*inputs), calls)
                else:
                    block = workers.run(column, calls)
                times[column] += block
                medians[column] = statistics.median(block)
            ratios.append(medians["traced"] / medians["untraced"])
    return {column: statistics.median(values) for column, values in times.items()}, ratios, workers


def same_outputs_as(expected):
    """A check that a traced model's outputs are the untraced model's."""
    def check(outputs):
        torch.testing.assert_close(outputs["last_hidden_state"], expected.last_hidden_state, rtol=1e-4, atol=5e-5)
    return check


def print_table(rows, args, load_before) -> None:
    from neuronx_distributed.trace.workers import default_threads_per_worker

    load = ", ".join(f"{value:.1f}" for value in (*load_before, *os.getloadavg()))
    print(f"\n{os.cpu_count()} CPU cores (load averages before, after: {load}), torch {torch.__version__}, "
          f"TP={TP} workers with {default_threads_per_worker(TP)} thread(s) each, untraced with "
          f"{torch.get_num_threads()}; ms per call, medians of {args.rounds} rounds x {args.calls} calls\n")
    header = ["model", "untraced 1 proc", "eager TP=2", "exported TP=2", "traced TP=2", "traced / untraced",
              "rounds' ratios min-max", "dispatch overhead"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, medians, ratios in rows:
        cells = [f"{medians[column]:.3f}" if medians[column] == medians[column] else "-" for column in COLUMNS]
        ratio_cells = (f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}-{max(ratios):.2f}") if ratios else ("-", "-")
        print(f"| {name} | " + " | ".join(cells) + f" | {' | '.join(ratio_cells)} | "
              f"{medians['traced'] - medians['exported']:.3f} |")


def print_breakdown(name: str, untraced: dict, tensor_parallel: dict, calls: int) -> None:
    print(f"\nWhere a forward's time goes, {name}: ms per call (torch.profiler self times, mean of the fastest "
          f"quarter of {calls} calls; an all-reduce includes waiting for the other rank)\n")
    print(f"| operators | untraced 1 proc, {torch.get_num_threads()} threads | exported TP={TP}, rank 0 |")
    print("|---|---|---|")
    for row in BREAKDOWN_ROWS:
        print(f"| {row} | {untraced[row]:.3f} | {tensor_parallel[row]:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="timed calls per column per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="rows to measure")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile each MiniLM row's forward by operator kind (untraced and TP rank 0)")
    args = parser.parse_args()
    import tp_inference_minilm as example
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(example.MODEL_DIR)
    reference = AutoModel.from_pretrained(example.MODEL_DIR).eval()
    rows, breakdowns = [], []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "bert.pt")
        torch.save({"model": reference.state_dict()}, checkpoint)
        builds = {"parallelize": build_parallelized, "tutorial": partial(example.get_model, checkpoint)}
        for model in args.models:
            if model == "tiny":
                tiny, _, workers = measure(build_tiny_layer, (torch.randn(1, 8),), None, args.rounds,
                                           args.calls * 20, tmp, "tiny")
                workers.stop()
                rows.append(("tiny layer (dispatch)", tiny, []))
                continue
            name, _, batch = model.partition("-b")
            batch = int(batch or 1)
            inputs = example.encode(tokenizer, (example.SENTENCES * batch)[:batch], max_length=SEQ)
            with torch.inference_mode():
                expected = reference(*inputs)
            medians, ratios, workers = measure(builds[name], inputs, reference, args.rounds, args.calls, tmp,
                                               model, same_outputs_as(expected))
            label = f"MiniLM {name} b={batch} s={SEQ}"
            if args.breakdown:
                untraced = op_breakdown_ms(lambda: reference(*inputs), 4 * args.calls)
                breakdowns.append((label, untraced, workers.run("breakdown", 4 * args.calls)))
            workers.stop()
            rows.append((label, medians, ratios))
    print_table(rows, args, load_before)
    for label, untraced, tensor_parallel in breakdowns:
        print_breakdown(label, untraced, tensor_parallel, 4 * args.calls)


if __name__ == "__main__":
    main()

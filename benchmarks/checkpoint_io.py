"""Checkpoint I/O of a BERT-large-sized model (~335M parameters, fp32) at TP=2, against plain file I/O.

Two processes (one gloo world, TP=2) each hold their shard of the model. The table
compares `parallel_layers.save` / `load` with a plain copy of the same bytes on the
same disk in the same run (`shutil.copyfile` + fsync of the shard files, both ranks
at once), plus raw writes and reads of those bytes; and gives the peak RSS per rank
of loading the unsharded checkpoint (`model.safetensors`, from `nxd checkpoint
merge`) into the TP=2 model. Page cache is warm (files were just written);
every timed step starts after `os.sync()` and is the median of 5 runs.
`--layers` scales the model (BERT-large's shapes with more or fewer layers).

    .venv/bin/python benchmarks/checkpoint_io.py [--dir /path/on/the/disk/to/test] [--layers 24]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HIDDEN, LAYERS, FFN, VOCAB, POSITIONS = 1024, 24, 4096, 30522, 512


class BertLargeShapes(nn.Module):
    """BERT-large's parameter shapes, sharded as the seed shards BERT (Q, K, V, FFN-in column; outputs row)."""

    def __init__(self, layers: int = LAYERS):
        from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

        super().__init__()
        fast = nn.init.zeros_  # I/O does not depend on the values; skip the full-size random init
        self.word_embeddings = ParallelEmbedding(VOCAB, HIDDEN, init_method=fast)
        self.position_embeddings = nn.Embedding(POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.embeddings_norm = nn.LayerNorm(HIDDEN)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            for name in ("query", "key", "value"):
                setattr(layer, name, ColumnParallelLinear(HIDDEN, HIDDEN, gather_output=False, init_method=fast))
            layer.attention_output = RowParallelLinear(HIDDEN, HIDDEN, input_is_parallel=True, init_method=fast)
            layer.attention_norm = nn.LayerNorm(HIDDEN)
            layer.intermediate = ColumnParallelLinear(HIDDEN, FFN, gather_output=False, init_method=fast)
            layer.output = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, init_method=fast)
            layer.output_norm = nn.LayerNorm(HIDDEN)
            self.layers.append(layer)
        self.pooler = nn.Linear(HIDDEN, HIDDEN)
        with torch.no_grad():
            for param in self.parameters():
                param.normal_(0, 0.02)


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _timed(fn, repeats: int = 5) -> float:
    """Median wall time of `fn` on every rank at once, each run starting with no dirty pages to write back."""
    times = []
    for _ in range(repeats):
        os.sync()
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _release_freed_memory() -> None:
    """Return freed heap to the OS so RSS shows live memory (init builds full master weights, then slices)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _fsync_copy(source: str, target: str) -> None:
    shutil.copyfile(source, target)
    with open(target, "rb") as file:
        os.fsync(file.fileno())


def _raw_write(tensors, path: str) -> None:
    with open(path, "wb") as file:
        for tensor in tensors:
            file.write(tensor.detach().contiguous().view(torch.uint8).numpy().data)
        file.flush()
        os.fsync(file.fileno())


def _raw_read(path: str) -> None:
    buffer = bytearray(os.path.getsize(path))
    with open(path, "rb", buffering=0) as file:
        file.readinto(buffer)


def _io_worker(rank: int, world: int, root: str, layers: int, results: str) -> None:
    from neuronx_distributed import parallel_state
    from neuronx_distributed.parallel_layers import checkpoint_format as fmt
    from neuronx_distributed.parallel_layers import load, save

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-io", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world)
    torch.manual_seed(0)  # the same replicated weights on both TP ranks, as save checks
    model = BertLargeShapes(layers)
    sharded = os.path.join(root, "sharded")
    state = {"model": model.state_dict(), "epoch": 1}
    timings = {"save": _timed(lambda: save(state, sharded))}
    manifest = fmt.read_manifest(sharded)
    shard = os.path.join(sharded, manifest.files[rank].path)
    timings["copy"] = _timed(lambda: _fsync_copy(shard, os.path.join(root, f"copy-{rank}")))
    timings["raw_write"] = _timed(lambda: _raw_write(list(state["model"].values()), os.path.join(root, f"raw-{rank}")))
    timings["load"] = _timed(lambda: load(sharded, model=model))
    timings["load_noverify"] = _timed(lambda: load(sharded, model=model, verify=False))
    timings["load_dict"] = _timed(lambda: load(sharded))
    timings["raw_read"] = _timed(lambda: _raw_read(os.path.join(root, f"raw-{rank}")))
    if rank == 0:
        timings["bytes"] = sum(entry.bytes for entry in manifest.files)
        timings["params"] = sum(math.prod(e.shape) for e in manifest.tensors.values())
        with open(results, "w") as file:
            json.dump(timings, file)
    dist.barrier()
    dist.destroy_process_group()


def _rss_worker(rank: int, world: int, root: str, layers: int, results: str) -> None:
    from neuronx_distributed import parallel_state
    from neuronx_distributed.parallel_layers import load

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-rss", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world)
    before_model = _rss_mib("VmRSS")
    torch.manual_seed(0)  # the same replicated weights on both TP ranks, as save checks
    model = BertLargeShapes(layers)
    _release_freed_memory()
    with_model = _rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current RSS: the peak below is the load's
    dist.barrier()
    start = time.perf_counter()
    load(os.path.join(root, "unsharded"), model=model, sharded=False)
    seconds = time.perf_counter() - start
    peak = _rss_mib("VmHWM")
    with open(f"{results}.{rank}", "w") as file:
        json.dump({"before_model": before_model, "with_model": with_model, "peak": peak, "seconds": seconds}, file)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=LAYERS, help=f"transformer layers (default {LAYERS}, BERT-large)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="nxd-ckpt-bench-", dir=args.dir)
    try:
        io_results = os.path.join(root, "io.json")
        mp.start_processes(_io_worker, args=(2, root, args.layers, io_results), nprocs=2, start_method="spawn")
        with open(io_results) as file:
            io = json.load(file)
        from neuronx_distributed.parallel_layers import checkpoint_tools

        os.sync()
        start = time.perf_counter()
        checkpoint_tools.merge(os.path.join(root, "sharded"), os.path.join(root, "unsharded"))
        merge_seconds = time.perf_counter() - start
        unsharded_bytes = os.path.getsize(os.path.join(root, "unsharded", "model.safetensors"))
        rss_results = os.path.join(root, "rss.json")
        mp.start_processes(_rss_worker, args=(2, root, args.layers, rss_results), nprocs=2, start_method="spawn")
        rss = []
        for rank in range(2):
            with open(f"{rss_results}.{rank}") as file:
                rss.append(json.load(file))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gib = io["bytes"] / 1024**3
    print(f"BERT-large shapes, {args.layers} layers: {io['params'] / 1e6:.0f}M parameters, fp32, TP=2 on 2 processes; "
          f"checkpoint {gib:.2f} GiB; disk under {args.dir or tempfile.gettempdir()}")
    print()
    print(f"| {'operation':<48} | {'seconds':>7} | {'GiB/s':>6} | {'vs plain copy':>13} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 8}|{'-' * 15}|")
    rows = [
        ("plain copy of the shard files (cp + fsync)", io["copy"]),
        ("raw write of the same bytes (+ fsync)", io["raw_write"]),
        ("raw read of the same bytes", io["raw_read"]),
        ("save (safetensors + fsync + crc32 + manifest)", io["save"]),
        ("load into model (crc32 verify)", io["load"]),
        ("load into model (verify=False)", io["load_noverify"]),
        ("load the whole dict, no model (ranks take turns)", io["load_dict"]),
        ("nxd checkpoint merge (verify + unshard, 1 run)", merge_seconds),
    ]
    for name, seconds in rows:
        rate = gib / seconds
        print(f"| {name:<48} | {seconds:7.2f} | {rate:6.2f} | {io['copy'] / seconds:12.0%} |")
    print()
    unsharded_mib = unsharded_bytes / 1024**2
    print(f"Unsharded checkpoint ({unsharded_mib:.0f} MiB model.safetensors) -> TP=2 model, per rank. The target "
          "(< 0.6x) is on the memory the model and its load take: peak minus the RSS before the model "
          "(Python + torch, the same with or without a checkpoint).")
    print(f"| {'rank':>4} | {'RSS before model':>16} | {'model shard':>11} | {'peak during load':>16} | "
          f"{'load above model':>16} | {'(peak - before model) / ckpt':>28} | {'peak / ckpt':>11} | {'seconds':>7} |")
    print(f"|{'-' * 6}|{'-' * 18}|{'-' * 13}|{'-' * 18}|{'-' * 18}|{'-' * 30}|{'-' * 13}|{'-' * 9}|")
    for rank, row in enumerate(rss):
        print(f"| {rank:>4} | {row['before_model']:12.0f} MiB | {row['with_model'] - row['before_model']:7.0f} MiB | "
              f"{row['peak']:12.0f} MiB | {row['peak'] - row['with_model']:12.0f} MiB | "
              f"{(row['peak'] - row['before_model']) / unsharded_mib:27.2f}x | {row['peak'] / unsharded_mib:10.2f}x | "
              f"{row['seconds']:7.2f} |")

if __name__ == "__main__":
    main()

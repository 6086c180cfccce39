"""Checkpoint I/O at TP=2 against plain file I/O: BERT-large shapes (~335M parameters, fp32) and a Llama-1B shape (bf16).

Two processes (one gloo world, TP=2) each hold their shard of the model. The table
compares `parallel_layers.save` / `load` with a plain copy of the same bytes on the
same disk in the same run (`shutil.copyfile` + fsync of the shard files, both ranks
at once), plus raw writes and reads of those bytes; and gives the peak RSS per rank
of loading the unsharded checkpoint (`model.safetensors`, from `nxd checkpoint
merge`) into the TP=2 model, and the checkpoint's bytes on disk against what it
would hold if every TP rank wrote its own copy of each replicated tensor.

The steps run in `--repeats` rounds, each round every step once in turn, so that
load from other processes on the machine falls on all of them alike. "vs plain
copy" is the copy's seconds over the step's in the same round (100%: as fast as
copying the checkpoint's bytes, more is faster); the table shows the median over
rounds and the lowest and highest. Every row is measured against that one copy,
including merge (rank 0 alone, while the copy runs both ranks at once). Page cache
is warm (the files were just written); every step starts after `os.sync()`.

`--model` picks BERT-large's shapes (24 layers of hidden 1024, FFN 4096, vocab 30522,
Q/K/V and FFN-in column-parallel, outputs row-parallel), the Llama-1B shape (16
layers of hidden 2048, 32 query / 8 KV heads through `GQAQKVColumnParallelLinear`,
SwiGLU MLP 5632, vocab 32000, untied LM head, bf16), or both (the default);
`--layers` scales the chosen models' depth.

    .venv/bin/python benchmarks/checkpoint_io.py [--model both|bert-large|llama1b] [--layers N] [--repeats 5] [--dir /path/on/the/disk]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HIDDEN, LAYERS, FFN, VOCAB, POSITIONS = 1024, 24, 4096, 30522, 512
LLAMA_HIDDEN, LLAMA_LAYERS, LLAMA_HEADS, LLAMA_KV_HEADS, LLAMA_FFN, LLAMA_VOCAB = 2048, 16, 32, 8, 5632, 32000


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
        _random_values(self)


class Llama1BShapes(nn.Module):
    """A Llama-1B shape in bf16: GQA attention (separate q/k/v weights, KV heads split across TP), SwiGLU MLP
    (gate, up column; down row), RMSNorm weights, vocab-parallel embedding and a column-parallel LM head."""

    def __init__(self, layers: int = LLAMA_LAYERS):
        from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear
        from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

        super().__init__()
        fast, dtype, hidden = nn.init.zeros_, torch.bfloat16, LLAMA_HIDDEN
        head_dim = hidden // LLAMA_HEADS
        self.embed_tokens = ParallelEmbedding(LLAMA_VOCAB, hidden, init_method=fast, dtype=dtype)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.qkv_proj = GQAQKVColumnParallelLinear(
                hidden, [hidden, LLAMA_KV_HEADS * head_dim], bias=False, gather_output=False, dtype=dtype,
                init_method=fast, fuse_qkv=False, num_attention_heads=LLAMA_HEADS, num_key_value_heads=LLAMA_KV_HEADS,
            )
            layer.o_proj = RowParallelLinear(hidden, hidden, bias=False, input_is_parallel=True, dtype=dtype, init_method=fast)
            for name in ("gate_proj", "up_proj"):
                setattr(layer, name, ColumnParallelLinear(hidden, LLAMA_FFN, bias=False, gather_output=False,
                                                          dtype=dtype, init_method=fast))
            layer.down_proj = RowParallelLinear(LLAMA_FFN, hidden, bias=False, input_is_parallel=True, dtype=dtype,
                                                init_method=fast)
            layer.input_layernorm = nn.RMSNorm(hidden, dtype=dtype)
            layer.post_attention_layernorm = nn.RMSNorm(hidden, dtype=dtype)
            self.layers.append(layer)
        self.norm = nn.RMSNorm(hidden, dtype=dtype)
        self.lm_head = ColumnParallelLinear(hidden, LLAMA_VOCAB, bias=False, gather_output=False, dtype=dtype, init_method=fast)
        _random_values(self)


MODELS = {"bert-large": (BertLargeShapes, LAYERS, "BERT-large shapes", "fp32"),
          "llama1b": (Llama1BShapes, LLAMA_LAYERS, "Llama-1B shape", "bf16")}


def _random_values(model: nn.Module) -> None:
    """Fill every parameter with N(0, 0.02) (the same on every rank under the same seed)."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _timed_once(fn) -> float:
    """Wall time of `fn` on every rank at once (until the last finishes), starting with no dirty pages to write back."""
    os.sync()
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


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


def _raw_read(path: str, buffer: bytearray) -> None:
    """Read the file into `buffer` (allocated and touched once, as a model's memory is before a load)."""
    with open(path, "rb", buffering=0) as file:
        file.readinto(buffer)


def _io_worker(rank: int, world: int, root: str, model_name: str, layers: int, repeats: int, results: str) -> None:
    from neuronx_distributed import parallel_state
    from neuronx_distributed.parallel_layers import checkpoint_format as fmt
    from neuronx_distributed.parallel_layers import load, save

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-io", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world)
    torch.manual_seed(0)  # the same replicated weights on both TP ranks, as save checks
    model = MODELS[model_name][0](layers)
    sharded, unsharded = os.path.join(root, "sharded"), os.path.join(root, "unsharded")
    state = {"model": model.state_dict(), "epoch": 1}
    save(state, sharded)
    raw, shard = os.path.join(root, f"raw-{rank}"), {}
    _raw_write(list(state["model"].values()), raw)
    buffer = bytearray(os.path.getsize(raw))
    steps = {
        "copy": lambda: _fsync_copy(shard["path"], os.path.join(root, f"copy-{rank}")),
        "raw_write": lambda: _raw_write(list(state["model"].values()), raw),
        "raw_read": lambda: _raw_read(raw, buffer),
        "save": lambda: save(state, sharded),
        "load": lambda: load(sharded, model=model),
        "load_noverify": lambda: load(sharded, model=model, verify=False),
        "load_dict": lambda: load(sharded),
        "merge": lambda: _merge(rank, sharded, unsharded),
    }
    timings = {step: [] for step in steps}
    for _ in range(repeats):
        shard["path"] = os.path.join(sharded, fmt.read_manifest(sharded).files[rank].path)  # each save names its own
        for step, run in steps.items():
            timings[step].append(_timed_once(run))
    if rank == 0:
        manifest = fmt.read_manifest(sharded)
        timings["bytes"] = sum(entry.bytes for entry in manifest.files)
        timings["disk_bytes"] = _bytes_on_disk(sharded)
        timings["per_rank_copies_bytes"] = timings["disk_bytes"] + sum(
            (manifest.tensor_parallel_size - 1) * math.prod(entry.shape) * getattr(torch, entry.dtype).itemsize
            for entry in manifest.tensors.values() if entry.file is not None
        )
        timings["params"] = sum(math.prod(e.shape) for e in manifest.tensors.values())
        with open(results, "w") as file:
            json.dump(timings, file)
    dist.barrier()
    dist.destroy_process_group()


def _merge(rank: int, sharded: str, unsharded: str) -> None:
    """`nxd checkpoint merge` on rank 0 with every CPU thread (as the command runs); the other ranks wait."""
    from neuronx_distributed.parallel_layers import checkpoint_tools

    if rank == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            checkpoint_tools.merge(sharded, unsharded)
        finally:
            torch.set_num_threads(threads)


def _bytes_on_disk(folder: str) -> int:
    """Bytes of every file under `folder`."""
    return sum(os.path.getsize(os.path.join(top, name)) for top, _, names in os.walk(folder) for name in names)


def _rss_worker(rank: int, world: int, root: str, model_name: str, layers: int, results: str) -> None:
    from neuronx_distributed import parallel_state
    from neuronx_distributed.parallel_layers import load

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store-rss", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world)
    before_model = _rss_mib("VmRSS")
    torch.manual_seed(0)  # the same replicated weights on both TP ranks, as save checks
    model = MODELS[model_name][0](layers)
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


def _measure(model_name: str, layers: int, repeats: int, folder: str | None) -> None:
    """Run the I/O and the RSS workers for one model and print its two tables."""
    root = tempfile.mkdtemp(prefix="nxd-ckpt-bench-", dir=folder)
    try:
        io_results = os.path.join(root, "io.json")
        mp.start_processes(_io_worker, args=(2, root, model_name, layers, repeats, io_results), nprocs=2,
                           start_method="spawn")
        with open(io_results) as file:
            io = json.load(file)
        unsharded_bytes = os.path.getsize(os.path.join(root, "unsharded", "model.safetensors"))
        rss_results = os.path.join(root, "rss.json")
        mp.start_processes(_rss_worker, args=(2, root, model_name, layers, rss_results), nprocs=2, start_method="spawn")
        rss = []
        for rank in range(2):
            with open(f"{rss_results}.{rank}") as file:
                rss.append(json.load(file))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    _, _, title, dtype = MODELS[model_name]
    gib = io["bytes"] / 1024**3
    print(f"{title}, {layers} layers: {io['params'] / 1e6:.0f}M parameters, {dtype}, TP=2 on 2 processes; "
          f"checkpoint {gib:.2f} GiB; disk under {folder or tempfile.gettempdir()}; {repeats} rounds")
    print()
    print(f"| {'operation':<48} | {'seconds':>7} | {'GiB/s':>6} | {'vs plain copy':>13} | {'lowest - highest':>16} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 8}|{'-' * 15}|{'-' * 18}|")
    rows = [
        ("plain copy of the shard files (cp + fsync)", "copy"),
        ("raw write of the same bytes (+ fsync)", "raw_write"),
        ("raw read of the same bytes", "raw_read"),
        ("save (safetensors + fsync + crc32 + manifest)", "save"),
        ("load into model (crc32 verify)", "load"),
        ("load into model (verify=False)", "load_noverify"),
        ("load the whole dict, no model (ranks take turns)", "load_dict"),
        ("nxd checkpoint merge (verify + unshard, rank 0)", "merge"),
    ]
    for name, step in rows:
        seconds = statistics.median(io[step])
        ratios = sorted(copy / own for copy, own in zip(io["copy"], io[step]))
        print(f"| {name:<48} | {seconds:7.2f} | {gib / seconds:6.2f} | {statistics.median(ratios):12.0%} | "
              f"{ratios[0]:6.0%} - {ratios[-1]:6.0%} |")
    print()
    mib = 1024**2
    print(f"Bytes on disk of the TP=2 checkpoint: {io['disk_bytes'] / mib:.1f} MiB with each replicated tensor written "
          f"once; {io['per_rank_copies_bytes'] / mib:.1f} MiB if every TP rank wrote its own copy (computed from the "
          f"manifest, headers aside): {1 - io['disk_bytes'] / io['per_rank_copies_bytes']:.2%} smaller.")
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
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure (default: a temporary folder)")
    parser.add_argument("--model", choices=["both", *MODELS], default="both", help="the model shapes (default: both)")
    parser.add_argument("--layers", type=int, default=None,
                        help=f"transformer layers (default {LAYERS} for BERT-large, {LLAMA_LAYERS} for Llama-1B)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed steps, the median is shown (default 3)")
    args = parser.parse_args()
    for model_name in MODELS if args.model == "both" else [args.model]:
        _measure(model_name, args.layers or MODELS[model_name][1], args.repeats, args.dir)


if __name__ == "__main__":
    main()

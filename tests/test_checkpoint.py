"""Sharded checkpoints across real processes: save at one TP degree, load at another, bit for bit.

The state is built so that every TP degree holds exact slices of the unsharded
reference: the TP model's initialization is sliced from the full one, and the
optimizer steps on gradients that are slices of full reference gradients
(AdamW is elementwise), so checkpoint tensors can be compared with `torch.equal`.
"""

from __future__ import annotations

import json
import os
import struct
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from models import MLP, SelfAttention, expected_shard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import (
    CheckpointArgumentError,
    CheckpointCorruptError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    CheckpointShapeError,
    IncompleteCheckpointError,
    ReshardError,
    UnsafeCheckpointError,
)
from neuronx_distributed.parallel_layers import ParallelEmbedding, all_reduce_gradients, load, save

HIDDEN, FFN, HEADS, VOCAB, SEED = 16, 32, 4, 24, 1234
# (world size, TP degree) of each saved checkpoint: DP > 1 in the first two, so only DP rank 0 writes.
SAVE_TOPOLOGIES = [(2, 1), (4, 2), (4, 4)]


class Net(nn.Module):
    """Embedding -> self-attention (fused QKV, stride 3) -> LayerNorm -> MLP; TP layers when `parallel`."""

    def __init__(self, parallel: bool, ffn: int = FFN):
        super().__init__()
        self.embed = ParallelEmbedding(VOCAB, HIDDEN) if parallel else nn.Embedding(VOCAB, HIDDEN)
        self.attention = SelfAttention(HIDDEN, HEADS, parallel, fused_qkv=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.mlp = MLP(HIDDEN, ffn, parallel)
        # Computed, not saved, like Hugging Face BERT's position_ids (which its files still carry).
        self.register_buffer("positions", torch.arange(8), persistent=False)

    def forward(self, ids):
        hidden = self.embed(ids)
        hidden = hidden + self.attention(hidden)
        return self.mlp(self.norm(hidden))


def _tp():
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()
    return 0, 1


def _full_gradients(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    shapes = {name: p.shape for name, p in Net(parallel=False).named_parameters()}
    generator = torch.Generator().manual_seed(SEED + step)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _trained_state(parallel: bool, steps: int = 2, named: bool = False):
    """Model, optimizer and scheduler after `steps` AdamW steps on sliced reference gradients."""
    torch.manual_seed(SEED)
    model = Net(parallel)
    params = model.named_parameters() if named else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for step in range(steps):
        full = _full_gradients(step)
        for name, param in model.named_parameters():
            param.grad = expected_shard(full[name], param, *_tp()).clone()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _checkpoint(model, optimizer, scheduler) -> dict:
    return {
        "epoch": 7,
        "loss": torch.tensor(0.25),
        "note": "nested",
        "history": [1.5, float("inf"), (2, None)],
        "model": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }


def _case_save(save_dir: str, named: bool = False):
    model, optimizer, scheduler = _trained_state(parallel=True, named=named)  # alive while saving
    save(_checkpoint(model, optimizer, scheduler), save_dir)
    return sorted(os.listdir(save_dir))


def _assert_matches_reference(model, optimizer_state: dict, reference_model, reference_optimizer):
    reference = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), expected_shard(reference[name].detach(), param, *_tp())), name
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    optimizer.load_state_dict(optimizer_state)
    for (name, param), reference_param in zip(model.named_parameters(), reference_model.parameters()):
        state, reference_state = optimizer.state[param], reference_optimizer.state[reference_param]
        assert torch.equal(state["step"], reference_state["step"]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], expected_shard(reference_state[key], param, *_tp())), (name, key)
    assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]


def _case_load_and_compare(save_dirs: list[str]):
    reference_model, reference_optimizer, reference_scheduler = _trained_state(parallel=False)
    for save_dir in save_dirs:
        torch.manual_seed(SEED + 99)  # different weights, overwritten by the load
        model = Net(parallel=True)
        rest = load(save_dir, model=model)
        assert "model" not in rest
        assert (rest["epoch"], rest["note"], rest["history"]) == (7, "nested", [1.5, float("inf"), (2, None)])
        assert torch.equal(rest["loss"], torch.tensor(0.25))
        assert rest["scheduler"] == reference_scheduler.state_dict()
        _assert_matches_reference(model, rest["optimizer_state_dict"], reference_model, reference_optimizer)
        whole = load(save_dir)  # without a model: this rank's whole checkpoint dict
        for name, param in model.named_parameters():
            assert torch.equal(whole["model"][name], param.detach()), name


@pytest.fixture(scope="module")
def saved(pools, tmp_path_factory):
    """One checkpoint per saving topology: {tp: save_dir}."""
    root = tmp_path_factory.mktemp("saved")
    dirs = {}
    for world_size, tp in SAVE_TOPOLOGIES:
        dirs[tp] = str(root / f"tp{tp}")
        listings = pools.run(world_size, tp, _case_save, dirs[tp])
        assert listings[0] == ["manifest.json", *[f"tp_rank_{rank:02d}" for rank in range(tp)]]
    return dirs


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_round_trip_any_tp_to_any_tp(pools, saved, world_size, tp):
    pools.run(world_size, tp, _case_load_and_compare, [saved[1], saved[2], saved[4]])


def test_unsharded_dict_in_one_process(saved):
    """Without a process group, load(dir) returns the whole unsharded checkpoint."""
    reference_model, reference_optimizer, _ = _trained_state(parallel=False)
    whole = load(saved[4])
    for name, param in reference_model.named_parameters():
        assert torch.equal(whole["model"][name], param.detach()), name


def _case_resume(save_dir: str):
    """Training continued after a save equals training resumed from it, bit for bit."""

    def train(model, optimizer, steps, first):
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_size()
        for step in range(first, first + steps):
            ids = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(step))
            local = ids[dp_rank * 4 // dp_size:(dp_rank + 1) * 4 // dp_size]
            loss = F.mse_loss(model(local), torch.ones(local.shape[0], 3, HIDDEN))
            optimizer.zero_grad()
            loss.backward()
            all_reduce_gradients(model.parameters(), group=parallel_state.get_data_parallel_group())
            optimizer.step()

    torch.manual_seed(SEED)
    model = Net(parallel=True)
    optimizer = torch.optim.AdamW(model.named_parameters(), lr=0.01)
    train(model, optimizer, 2, first=0)
    save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 2}, save_dir)
    train(model, optimizer, 3, first=2)

    torch.manual_seed(SEED + 1)
    resumed = Net(parallel=True)
    resumed_optimizer = torch.optim.AdamW(resumed.named_parameters(), lr=0.01)
    rest = load(save_dir, model=resumed)
    resumed_optimizer.load_state_dict(rest["optimizer"])
    train(resumed, resumed_optimizer, 3, first=rest["step"])
    for (name, param), resumed_param in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(param, resumed_param), name


def test_training_resumes_bit_exact(pools, tmp_path):
    pools.run(4, 2, _case_resume, str(tmp_path / "resume"))


def _case_unsharded_sources(paths: list[str], model_key):
    torch.manual_seed(SEED)
    reference = dict(Net(parallel=False).named_parameters())
    for path in paths:
        torch.manual_seed(SEED + 5)
        model = Net(parallel=True)
        rest = load(path, model=model, model_key=model_key, sharded=False)
        assert rest == ({"epoch": 3} if path.endswith("under_key.pt") else None), path  # upstream's: the file's other entries
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), expected_shard(reference[name].detach(), param, *_tp())), (path, name)


def test_unsharded_checkpoints_load_into_sharded_model(pools, tmp_path):
    torch.manual_seed(SEED)
    state = {**Net(parallel=False).state_dict(), "positions": torch.arange(8)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "under_key.pt")
    torch.save(state, tmp_path / "bare.pt")
    save_file(state, tmp_path / "weights.safetensors")
    folder = tmp_path / "hf"
    folder.mkdir()
    keys = list(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file_name, part in halves.items():
        save_file({key: state[key] for key in part}, folder / file_name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {key: name for name, part in halves.items() for key in part}}
    (folder / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    paths = [str(tmp_path / name) for name in ("under_key.pt", "bare.pt", "weights.safetensors", "hf")]
    pools.run(4, 4, _case_unsharded_sources, paths, "model")
    pools.run(2, 2, _case_unsharded_sources, paths, "model")


def _case_read_order(save_dir: str, model_only_dir: str, rendezvous: str):
    """Load the whole dict, timing this rank's reads; then load only a model, every rank's first read
    waiting until all ranks are reading (which never happens if they take turns). Returns the timed span."""
    import time

    from neuronx_distributed.parallel_layers.sharded_source import ShardedSource

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    read, read_into, times, waited = ShardedSource.read, ShardedSource.read_into, [], []

    def timed_read(self, name):
        times.append(time.monotonic())
        time.sleep(0.005)  # spans long enough to overlap if the ranks read at once
        tensor = read(self, name)
        times.append(time.monotonic())
        return tensor

    def read_once_all_are_reading(self, out, name, target=None):
        if not waited:
            open(os.path.join(rendezvous, str(rank)), "w").close()
            deadline = time.monotonic() + 20
            while len(os.listdir(rendezvous)) < world:
                assert time.monotonic() < deadline, f"only ranks {sorted(os.listdir(rendezvous))} of {world} read at once"
                time.sleep(0.01)
            waited.append(True)
        read_into(self, out, name, target)

    try:
        ShardedSource.read = timed_read
        load(save_dir)
        span = (times[0], times[-1])
        torch.manual_seed(SEED)
        model = Net(parallel=True)
        save(model.state_dict(), model_only_dir)
        ShardedSource.read_into = read_once_all_are_reading
        load(model_only_dir, model=model)
        assert waited, "the load into the model did not read through ShardedSource.read_into"
        return span
    finally:
        ShardedSource.read, ShardedSource.read_into = read, read_into


def test_loads_that_hold_a_shard_take_turns(pools, saved, tmp_path):
    """A load returning tensors beyond the model reads one rank of the host at a time; into a model, all at once."""
    rendezvous = tmp_path / "reading"
    rendezvous.mkdir()
    spans = sorted(pools.run(4, 2, _case_read_order, saved[2], str(tmp_path / "model_only"), str(rendezvous)))
    assert all(earlier[1] < later[0] for earlier, later in zip(spans, spans[1:])), spans


def test_optimizer_matched_by_param_names(pools, tmp_path):
    """An optimizer built from named_parameters() records the match; it reshards TP=4 -> TP=2."""
    save_dir = str(tmp_path / "named")
    pools.run(4, 4, _case_save, save_dir, named=True)
    pools.run(2, 2, _case_load_and_compare, [save_dir])


def _pickle_or_zip(data: bytes) -> bool:
    """Whether `data` starts like a torch.save file: a zip archive (the default) or a pickle (protocol 2 to 5)."""
    return data.startswith(b"PK\x03\x04") or (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5)


def test_no_pickle_in_our_format(saved, tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):  # the check recognises both kinds of torch.save file
        assert _pickle_or_zip((tmp_path / name).read_bytes()), name
    from neuronx_distributed.parallel_layers import checkpoint_format

    for save_dir in saved.values():
        manifest = checkpoint_format.read_manifest(save_dir)
        for rank in range(manifest.tensor_parallel_size):
            checkpoint_format.check_shard_file(save_dir, manifest, rank)
        count = 0
        for root, _, files in os.walk(save_dir):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as file:
                    data = file.read()
                assert not _pickle_or_zip(data), f"{path} is a zip archive or a pickle"
                if name.endswith(".json"):
                    json.loads(data)
                else:
                    assert name.endswith(".safetensors"), path
                    assert set(load_file(path)) == set(safe_open(path, "pt").keys())
                count += 1
        assert count == 1 + manifest.tensor_parallel_size  # nothing else in the folder


def test_values_outside_the_format_are_refused(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match="optimizer/fn"):
        save({"optimizer": {"fn": object()}}, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "manifest.json")


# ---------------------------------------------------------------- failures


def _case_killed_during_save(save_dir: str, kill_rank: int):
    """Rank `kill_rank` dies (SIGKILL) halfway through writing its shard file."""
    import signal

    from neuronx_distributed.parallel_layers import checkpoint_format

    def write_half_then_die(path, tensors, metadata):
        with open(path, "wb") as file:
            file.write(b"\x00" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)

    model, optimizer, scheduler = _trained_state(parallel=True, steps=3)
    if parallel_state.get_tensor_model_parallel_rank() == kill_rank:
        checkpoint_format.write_safetensors = write_half_then_die  # this worker dies; its pool is replaced afterwards
    save(_checkpoint(model, optimizer, scheduler), save_dir)


def test_rank_killed_during_save(pools, tmp_path):
    import shutil

    from distributed import WorkerError

    previous = str(tmp_path / "previous")
    shutil.copytree(_saved_tp2(pools, tmp_path), previous)
    fresh = str(tmp_path / "fresh")
    for save_dir in (previous, fresh):
        with pytest.raises(WorkerError):
            pools.run(2, 2, _case_killed_during_save, save_dir, 1, timeout=60)
    reference_model, _, _ = _trained_state(parallel=False)  # the 2-step state of the previous save
    whole = load(previous)
    for name, param in reference_model.named_parameters():
        assert torch.equal(whole["model"][name], param.detach()), name
    with pytest.raises(IncompleteCheckpointError, match="did not finish"):
        load(fresh)


def test_saving_over_a_checkpoint_replaces_it(pools, saved, tmp_path):
    """A TP=2 save over a TP=4 checkpoint leaves only the new one: the old files and extra rank folders go."""
    import shutil

    from neuronx_distributed.parallel_layers import checkpoint_format

    save_dir = str(tmp_path / "over")
    shutil.copytree(saved[4], save_dir)
    listings = pools.run(4, 2, _case_save, save_dir)
    assert listings[0] == ["manifest.json", "tp_rank_00", "tp_rank_01"]
    for entry in checkpoint_format.read_manifest(save_dir).files:
        folder, name = os.path.split(entry.path)
        assert os.listdir(os.path.join(save_dir, folder)) == [name]
    pools.run(2, 2, _case_load_and_compare, [save_dir])


def test_checksum_from_memory_matches_the_file(tmp_path):
    """The checksum computed from the tensors while saving is the one a reader computes from the file."""
    from neuronx_distributed.parallel_layers import checkpoint_format

    tensors = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "ints": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "a_last_name": torch.randn(2, 3, 4),
    }
    entry = checkpoint_format.write_shard_file(str(tmp_path), 0, "abc", tensors, {"structure": "any"})
    assert (entry.crc32, entry.bytes) == checkpoint_format.checksum_file(str(tmp_path / entry.path))


def _saved_tp2(pools, tmp_path) -> str:
    save_dir = str(tmp_path / "tp2")
    if not os.path.exists(save_dir):
        pools.run(2, 2, _case_save, save_dir)
    return save_dir


def test_flipped_byte_detected(saved, tmp_path):
    import shutil

    from neuronx_distributed.cli import main

    damaged = str(tmp_path / "damaged")
    shutil.copytree(saved[2], damaged)
    shard = next(p for p in (tmp_path / "damaged" / "tp_rank_01").iterdir())
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(data)
    with pytest.raises(CheckpointCorruptError, match="tp_rank_01"):
        load(damaged)
    assert main(["checkpoint", "verify", damaged]) == 1
    assert main(["checkpoint", "verify", saved[2]]) == 0


def test_missing_shard_folder_named(saved, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(saved[4], broken)
    shutil.rmtree(os.path.join(broken, "tp_rank_03"))
    with pytest.raises(CheckpointNotFoundError, match="tp_rank_03"):
        load(broken)


class _Exploit:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_pickle_refused(tmp_path):
    torch.manual_seed(SEED)
    model = Net(parallel=False)
    exploit = _Exploit()
    exploit.marker = str(tmp_path / "pwned")
    torch.save({"model": model.state_dict(), "payload": exploit}, tmp_path / "evil.pt")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load(str(tmp_path / "evil.pt"), model=model, sharded=False)
    assert not os.path.exists(exploit.marker)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def _case_errors_leave_model_unchanged(save_dir: str):
    torch.manual_seed(SEED + 3)
    wrong_size = Net(parallel=True, ffn=2 * FFN)
    extra_layer = Net(parallel=True)
    extra_layer.head = nn.Linear(HIDDEN, 2)
    attempts = [
        (wrong_size, {}, CheckpointShapeError, r"mlp\.fc1\.weight.*\(16, 16\).*\(32, 16\)"),
        (extra_layer, {}, CheckpointKeyError, r"missing keys \['head\.bias', 'head\.weight'\]"),
        (extra_layer, {"model_key": "weights"}, CheckpointKeyError, "model_key 'weights'"),
        (wrong_size, {"sharded": False, "model": None}, CheckpointArgumentError, "needs the model"),
    ]
    for model, kwargs, error, message in attempts:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        with pytest.raises(error, match=message):
            load(save_dir, **{"model": model, **kwargs})
        for name, param in model.named_parameters():
            assert torch.equal(param, before[name]), name


def test_errors_name_the_problem_and_leave_model_unchanged(pools, saved):
    pools.run(2, 2, _case_errors_leave_model_unchanged, saved[4])


def test_tp_degree_that_cannot_reshard(saved, tmp_path):
    from neuronx_distributed.cli import main
    from neuronx_distributed.parallel_layers import checkpoint_tools

    with pytest.raises(ReshardError, match="TP degree"):
        checkpoint_tools.reshard(saved[2], str(tmp_path / "tp3"), 3)
    assert main(["checkpoint", "reshard", saved[2], str(tmp_path / "tp3"), "--tp", "3"]) == 2
    assert not os.path.exists(tmp_path / "tp3" / "manifest.json")


# ---------------------------------------------------------------- command line


def test_merge_equals_unsharded_model(saved, tmp_path, capsys):
    from neuronx_distributed.cli import main

    reference_model, _, _ = _trained_state(parallel=False)
    reference = reference_model.state_dict()
    single, split = str(tmp_path / "merged"), str(tmp_path / "merged_split")
    assert main(["checkpoint", "merge", saved[4], single]) == 0
    assert main(["checkpoint", "merge", saved[2], split, "--max-shard-size", "2KB"]) == 0
    merged = load_file(os.path.join(single, "model.safetensors"))
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[key], reference[key]) for key in reference)
    assert os.path.exists(os.path.join(split, "model.safetensors.index.json"))
    for folder in (single, split):
        torch.manual_seed(0)
        model = Net(parallel=False)
        load(folder, model=model, sharded=False)
        assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())


def test_merge_over_an_earlier_merge(saved, tmp_path, monkeypatch):
    """A merge that fails half way leaves the earlier merge as it was; one that finishes replaces it whole."""
    from neuronx_distributed.parallel_layers import checkpoint_tools

    out = str(tmp_path / "merged")
    checkpoint_tools.merge(saved[2], out, max_shard_bytes=2048)
    earlier = {name: (tmp_path / "merged" / name).read_bytes() for name in os.listdir(out)}
    assert "model.safetensors.index.json" in earlier

    write = checkpoint_tools._write_merged

    def disk_full_on_the_second_file(path, **arguments):
        if any(name.endswith(".tmp") for name in os.listdir(out)):
            raise OSError(28, "No space left on device")
        write(path, **arguments)

    monkeypatch.setattr(checkpoint_tools, "_write_merged", disk_full_on_the_second_file)
    with pytest.raises(OSError, match="No space"):
        checkpoint_tools.merge(saved[4], out, max_shard_bytes=4096)
    assert {name: (tmp_path / "merged" / name).read_bytes() for name in os.listdir(out)} == earlier
    monkeypatch.undo()

    assert checkpoint_tools.merge(saved[4], out) == ["model.safetensors"]
    assert os.listdir(out) == ["model.safetensors"]


def _every_layout() -> dict[str, tuple[torch.Tensor, int | None, int, tuple]]:
    """name -> (full tensor, partition dim or None when replicated, stride, parts): each way merge reads a tensor.

    "kv_rows.weight" is made of parts along dim 1 whose second stores its one block twice (GQA's replicated KV
    heads), so each TP=2 rank holds a copy and the merge reads only rank 0's.
    """
    from neuronx_distributed.parallel_layers.resharding import Part

    generator = torch.Generator().manual_seed(SEED)

    def values(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator).to(dtype)

    return {
        "column.weight": (values(12, 6), 0, 1, ()),
        "fused_qkv.weight": (values(12, 6), 0, 3, ()),
        "row.weight": (values(6, 40), 1, 1, ()),  # a row wider than the small merge buffer below
        "row_strided.weight": (values(600, 8), 1, 2, ()),  # rows in two pieces per rank: > IOV_MAX views a block
        "conv.weight": (values(3, 8, 5, dtype=torch.bfloat16), 1, 2, ()),
        "last_dim.weight": (values(2, 3, 8), 2, 1, ()),
        "kv_rows.weight": (values(3, 10), 1, 1, (Part(8), Part(4, replication=2, block=2))),
        "norm.weight": (values(7), None, 1, ()),
        "empty": (values(0, 4), None, 1, ()),
        "steps": (torch.arange(5), None, 1, ()),
    }


def _stored_shard(full: torch.Tensor, dim: int, stride: int, parts: tuple, rank: int, size: int) -> torch.Tensor:
    """TP rank `rank`'s shard of `full` as a TP layer stores it: its slice of each stride block, or of each part
    with the part's blocks stored `replication` times."""
    if not parts:
        return expected_shard(full, SimpleNamespace(tensor_model_parallel=True, partition_dim=dim,
                                                    partition_stride=stride), rank, size).clone()
    pieces, at = [], 0
    for part in parts:
        logical = full.narrow(dim, at, part.logical_size)
        stored = torch.cat([block for block in logical.split(part.block, dim) for _ in range(part.replication)], dim)
        pieces.append(stored.chunk(size, dim)[rank])
        at += part.logical_size
    return torch.cat(pieces, dim)


def _case_save_every_layout(save_dir: str) -> None:
    from neuronx_distributed.parallel_layers.resharding import set_partition_parts
    from neuronx_distributed.parallel_layers.utils import set_tensor_model_parallel_attributes

    rank, size = _tp()
    state = {}
    for name, (full, dim, stride, parts) in _every_layout().items():
        if dim is None:
            state[name] = full
            continue
        state[name] = _stored_shard(full, dim, stride, parts, rank, size)
        set_tensor_model_parallel_attributes(state[name], True, dim, stride)
        if parts:
            set_partition_parts(state[name], parts)
    save({"model": state}, save_dir)


def test_merge_writes_every_layout_bit_for_bit(pools, tmp_path, monkeypatch):
    """Column-, row-parallel, strided (fused QKV), 3-D, replicated-block (GQA KV) and replicated tensors of three
    dtypes merge into exactly the full tensors, with merge's buffer as it is and smaller than one row; a flipped
    byte in a shard is refused, and the earlier merge stays."""
    from neuronx_distributed.parallel_layers import checkpoint_tools

    save_dir, out = str(tmp_path / "every_layout"), str(tmp_path / "merged")
    pools.run(2, 2, _case_save_every_layout, save_dir)
    expected = {name: full for name, (full, *_) in _every_layout().items()}
    for buffer_bytes in (checkpoint_tools._BUFFER_BYTES, 64):
        monkeypatch.setattr(checkpoint_tools, "_BUFFER_BYTES", buffer_bytes)
        assert checkpoint_tools.merge(save_dir, out) == ["model.safetensors"]
        merged = load_file(os.path.join(out, "model.safetensors"))
        assert merged.keys() == expected.keys()
        for name, full in expected.items():
            assert merged[name].dtype == full.dtype and torch.equal(merged[name], full), (name, buffer_bytes)
    earlier = (tmp_path / "merged" / "model.safetensors").read_bytes()

    shard = next((tmp_path / "every_layout" / "tp_rank_01").iterdir())
    data = bytearray(shard.read_bytes())
    (header_bytes,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + header_bytes])["model/row_strided.weight"]["data_offsets"]
    data[8 + header_bytes + (begin + end) // 2] ^= 0x10
    shard.write_bytes(data)
    with pytest.raises(CheckpointCorruptError, match="tp_rank_01"):
        checkpoint_tools.merge(save_dir, out)
    assert os.listdir(out) == ["model.safetensors"]
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == earlier


def test_merge_reads_through_short_reads_and_refuses_a_shard_file_that_ends_early(tmp_path, monkeypatch):
    """merge's reads fill every view in order even when each read returns only part of what was asked (as on a
    network filesystem), and raise, instead of looping on empty reads, on a shard file that shrank after it was
    checked."""
    from neuronx_distributed.parallel_layers.sharded_source import read_exactly

    (tmp_path / "short").write_bytes(bytes(range(10)))
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset: preadv(fd, [views[0][:2]], offset))
    views = [memoryview(bytearray(size)) for size in (3, 4, 3)]
    with open(tmp_path / "short", "rb", buffering=0) as file:
        read_exactly(file, views, 0, "merge")
        assert b"".join(map(bytes, views)) == bytes(range(10))
        monkeypatch.undo()
        first, second = memoryview(bytearray(6)), memoryview(bytearray(6))
        with pytest.raises(CheckpointCorruptError, match="ended"):
            read_exactly(file, [first, second], 0, "merge")
    assert bytes(first) == bytes(range(6)) and bytes(second[:4]) == bytes(range(6, 10))


def test_reshard_inspect(saved, tmp_path, capsys):
    from neuronx_distributed.cli import main

    out = str(tmp_path / "tp2")
    assert main(["checkpoint", "reshard", saved[4], out, "--tp", "2"]) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "tp_rank_00", "tp_rank_01"]
    original, resharded = load(saved[4]), load(out)
    assert resharded["epoch"] == original["epoch"]
    for key, value in original["optimizer_state_dict"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(resharded["optimizer_state_dict"]["state"][key][name], tensor), (key, name)
    capsys.readouterr()
    assert main(["checkpoint", "inspect", out]) == 0
    table = capsys.readouterr().out
    assert "TP degree 2" in table
    assert "model/attention.qkv.weight" in table and "sharded" in table and "0/3" in table


def test_merge_readable_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from neuronx_distributed.cli import main

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=FFN
    )
    torch.manual_seed(SEED)
    model = transformers.BertModel(config)
    save({"model": model.state_dict(), "epoch": 1}, str(tmp_path / "bert"))
    assert main(["checkpoint", "merge", str(tmp_path / "bert"), str(tmp_path / "hf")]) == 0
    loaded = transformers.BertModel.from_pretrained(str(tmp_path / "hf"), config=config)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

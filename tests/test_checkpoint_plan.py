"""The save plan over real processes: the same on every rank, replicated tensors stored once, upstream's save kwargs.

Checkpoints are compared with the unsharded TP=1 model built from the same seed (the
layers slice their initialization from the full one), and on disk through the shard
files' safetensors headers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import MLP, SelfAttention
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import CheckpointArgumentError
from neuronx_distributed.parallel_layers import ParallelEmbedding, load, save
from neuronx_distributed.parallel_layers import checkpoint_format as fmt
from neuronx_distributed.parallel_layers.checkpointing import plan_save

HIDDEN, FFN, HEADS, VOCAB, SEED = 16, 32, 4, 24, 99


class Net(nn.Module):
    def __init__(self, parallel: bool):
        super().__init__()
        self.embed = ParallelEmbedding(VOCAB, HIDDEN) if parallel else nn.Embedding(VOCAB, HIDDEN)
        self.attention = SelfAttention(HIDDEN, HEADS, parallel, fused_qkv=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.mlp = MLP(HIDDEN, FFN, parallel)


def _model(parallel: bool = True) -> Net:
    torch.manual_seed(SEED)
    return Net(parallel)


def _state(model: nn.Module) -> dict:
    """The model, a value the same on every rank, and one that differs per TP rank (a per-rank counter)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    return {"model": model.state_dict(), "step": torch.tensor(7), "per_rank": torch.tensor([rank, 10 + rank])}


def _case_plan() -> str:
    plan = plan_save(_state(_model()))
    return json.dumps({"tensors": {name: vars(entry) for name, entry in plan.tensors.items()}, "files": plan.files})


def test_the_plan_is_the_same_on_every_rank(pools):
    plans = pools.run(4, 2, _case_plan)
    assert len(set(plans)) == 1
    plan = json.loads(plans[0])
    assert plan["tensors"]["model/norm.weight"]["file"] == 0 and plan["tensors"]["step"]["file"] == 0
    assert plan["tensors"]["per_rank"].get("file") is None  # different on each rank: each file holds its own
    assert "model/norm.weight" in plan["files"][0] and "model/norm.weight" not in plan["files"][1]
    assert all("model/mlp.fc1.weight" in names and "per_rank" in names for names in plan["files"])


def _case_save(save_dir: str, **kwargs) -> None:
    model = _model()
    save(_state(model), save_dir, **kwargs)


def _case_load(save_dir: str) -> dict:
    model = _model()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    rest = load(save_dir, model=model)
    return {"model": {key: value.clone() for key, value in model.state_dict().items()}, **rest}


def _file_tensors(save_dir: str) -> list[set[str]]:
    manifest = fmt.read_manifest(save_dir)
    names = []
    for entry in manifest.files:
        with safe_open(os.path.join(save_dir, entry.path), framework="pt") as file:
            names.append(set(file.keys()))
    return names


def _check_loads(pools, save_dir: str, reference: dict) -> None:
    for world, tp in [(1, 1), (2, 2), (4, 4), (4, 2)]:
        for rank, loaded in enumerate(pools.run(world, tp, _case_load, save_dir)):
            tp_rank = rank % tp
            assert loaded["step"].item() == 7
            saved_rank = tp_rank if tp_rank < 2 else 0  # the source rank of the same index, else TP rank 0
            assert loaded["per_rank"].tolist() == [saved_rank, 10 + saved_rank]
        if tp == 1:
            for key, value in loaded["model"].items():
                assert torch.equal(value, reference[key]), key


def test_replicated_tensors_are_stored_once_and_load_at_any_tp(pools, tmp_path, capsys):
    save_dir = str(tmp_path / "tp2")
    pools.run(2, 2, _case_save, save_dir)
    first, second = _file_tensors(save_dir)
    manifest = fmt.read_manifest(save_dir)
    once = {name for name, entry in manifest.tensors.items() if entry.file is not None}
    assert {"model/norm.weight", "model/norm.bias", "model/mlp.fc2.bias", "step"} <= once
    assert once <= first and not once & second
    assert manifest.version == 3
    from neuronx_distributed.cli import main

    assert main(["checkpoint", "inspect", save_dir]) == 0
    assert "replicated (once, tp_rank_00)" in capsys.readouterr().out
    reference = _model(parallel=False).state_dict()
    _check_loads(pools, save_dir, reference)


def test_a_version_1_checkpoint_still_loads(pools, tmp_path):
    """Every file holding every replicated tensor, version 1: what earlier releases wrote."""
    save_dir = str(tmp_path / "v1")
    pools.run(2, 2, _case_save, save_dir)
    manifest_path = os.path.join(save_dir, fmt.MANIFEST_NAME)
    with open(manifest_path) as file:
        raw = json.load(file)
    with safe_open(os.path.join(save_dir, raw["files"][0]["path"]), framework="pt") as file:
        once = {name: file.get_tensor(name) for name, entry in raw["tensors"].items() if entry.pop("file", None) == 0}
    path = os.path.join(save_dir, raw["files"][1]["path"])
    with safe_open(path, framework="pt") as file:
        tensors, metadata = {name: file.get_tensor(name) for name in file.keys()}, file.metadata()
    save_file({**tensors, **once}, path, metadata=metadata)
    raw["files"][1]["crc32"], raw["files"][1]["bytes"] = fmt.checksum_file(path)
    for entry in raw["files"]:
        del entry["tensor_crc32"]  # version 3's
    raw["version"] = 1
    with open(manifest_path, "w") as file:
        json.dump(raw, file)
    assert fmt.read_manifest(save_dir).version == 1
    _check_loads(pools, save_dir, _model(parallel=False).state_dict())


def test_a_version_2_checkpoint_still_loads_and_verifies_whole_files(pools, tmp_path):
    """Version 2 records one crc32 per file and none per tensor: what the release before per-tensor checksums
    wrote. It loads, and damage in a file a rank reads is still caught by the whole-file checksum."""
    from neuronx_distributed.cli import main
    from neuronx_distributed.errors import CheckpointCorruptError

    save_dir = str(tmp_path / "v2")
    pools.run(2, 2, _case_save, save_dir)
    manifest_path = os.path.join(save_dir, fmt.MANIFEST_NAME)
    with open(manifest_path) as file:
        raw = json.load(file)
    for entry in raw["files"]:
        del entry["tensor_crc32"]
    raw["version"] = 2
    with open(manifest_path, "w") as file:
        json.dump(raw, file)
    manifest = fmt.read_manifest(save_dir)
    assert manifest.version == 2 and all(entry.tensor_crc32 is None for entry in manifest.files)
    _check_loads(pools, save_dir, _model(parallel=False).state_dict())
    assert main(["checkpoint", "verify", save_dir]) == 0
    path = os.path.join(save_dir, raw["files"][0]["path"])
    with open(path, "r+b") as file:
        file.seek(-3, os.SEEK_END)  # inside the last tensor's bytes
        byte = file.read(1)
        file.seek(-3, os.SEEK_END)
        file.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointCorruptError, match="tp_rank_00"):
        load(save_dir)
    assert main(["checkpoint", "verify", save_dir]) == 1


def test_down_cast_bf16_and_save_serially(pools, tmp_path):
    save_dir = str(tmp_path / "bf16")
    pools.run(4, 2, _case_save, save_dir, down_cast_bf16=True, save_serially=True, save_xser=True, master_dp_only=True)
    manifest = fmt.read_manifest(save_dir)
    assert {entry.dtype for name, entry in manifest.tensors.items() if name.startswith("model/")} == {"bfloat16"}
    assert manifest.tensors["step"].dtype == "int64"
    whole = load(save_dir)  # TP=1, no model: every tensor as saved
    reference = _model(parallel=False).state_dict()
    for key, value in reference.items():
        assert whole["model"][key].dtype == torch.bfloat16
        assert torch.equal(whole["model"][key], value.to(torch.bfloat16)), key


def _case_refused(save_dir: str, kwargs: dict) -> str:
    with pytest.raises(CheckpointArgumentError) as raised:
        save(_state(_model()), save_dir, **kwargs)
    return str(raised.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"master_dp_only": False}, "per DP rank"),
    ({"down_cast_bf16": "yes"}, "down_cast_bf16 must be True or False"),
    ({"save_serially": None}, "save_serially must be True or False"),
])
def test_upstream_kwargs_refused_on_every_rank(pools, tmp_path, kwargs, message):
    messages = pools.run(2, 2, _case_refused, str(tmp_path / "refused"), kwargs)
    assert all(message in text for text in messages)
    assert not os.path.exists(tmp_path / "refused" / fmt.MANIFEST_NAME)

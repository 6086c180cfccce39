"""Checkpoints and `nxd checkpoint` under careless or hostile input: nothing lost, nothing half-loaded, typed errors.

Each case is one that once went wrong: a CLI call that deleted a checkpoint, a
load that changed some ranks' models before another rank failed, ranks pairing
different collectives, shard files swapped between ranks, manifest entries that
point outside the folder or at a FIFO, a copied state dict saved as if its
shards were whole tensors, concurrent saves, and files left by a failed save.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_checkpoint import FFN, SEED, Net

from neuronx_distributed import parallel_state
from neuronx_distributed.cli import main
from neuronx_distributed.errors import (
    CheckpointArgumentError,
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointSaveError,
    ReplicatedMismatchError,
    ReshardError,
    TracedModelFolderError,
    UnsafeCheckpointError,
)
from neuronx_distributed.parallel_layers import checkpoint_format as fmt
from neuronx_distributed.parallel_layers import checkpoint_tools, load, save


def _case_save_model(save_dir: str, ffn: int = FFN, extra=None) -> None:
    torch.manual_seed(SEED)
    model = Net(parallel=True, ffn=ffn)
    save({"model": model.state_dict(), "epoch": 3, **(extra or {})}, save_dir)


@pytest.fixture(scope="module")
def tp2(pools, tmp_path_factory) -> str:
    """A TP=2 checkpoint of Net (saved by 2 processes)."""
    save_dir = str(tmp_path_factory.mktemp("trust") / "tp2")
    pools.run(2, 2, _case_save_model, save_dir)
    return save_dir


def _copy(source: str, tmp_path, name: str = "copy") -> str:
    target = str(tmp_path / name)
    shutil.copytree(source, target)
    return target


def _manifest(folder: str) -> dict:
    with open(os.path.join(folder, fmt.MANIFEST_NAME)) as file:
        return json.load(file)


def _write_manifest(folder: str, raw: dict) -> None:
    with open(os.path.join(folder, fmt.MANIFEST_NAME), "w") as file:
        json.dump(raw, file)


def _record_files(folder: str) -> None:
    """Rewrite the manifest's sizes and checksums (the file's and each tensor's) to match the files now on disk
    (as a careful forger would)."""
    raw = _manifest(folder)
    for entry in raw["files"]:
        path = os.path.join(folder, entry["path"])
        entry["bytes"] = os.path.getsize(path)
        entry["crc32"], entry["tensor_crc32"] = fmt.checksum_tensors(path)
    _write_manifest(folder, raw)


def _rewrite_shard(path: str, change_tensors=None, **metadata) -> None:
    """Rewrite a shard file with its tensors passed through `change_tensors` and metadata fields replaced."""
    with safe_open(path, framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        old_metadata = file.metadata()
    if change_tensors is not None:
        tensors = change_tensors(tensors)
    save_file(tensors, path, metadata={**old_metadata, **metadata})


def _snapshot(folder: str) -> dict[str, bytes]:
    snapshot = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                snapshot[os.path.relpath(path, folder)] = file.read()
    return snapshot


# ---------------------------------------------------------------- the nxd command


@pytest.mark.parametrize("tp", ["0", "-1", "abc", "1.5", ""])
def test_reshard_bad_tp_keeps_the_checkpoint_in_the_output(tp2, tmp_path, capsys, tp):
    """`nxd checkpoint reshard SRC EXISTING --tp 0` once printed success and deleted EXISTING's checkpoint."""
    out = _copy(tp2, tmp_path, "existing")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exited:
        main(["checkpoint", "reshard", tp2, out, "--tp", tp])
    assert exited.value.code == 2
    assert "TP degree" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize("tp", [0, -1, True, 2.0])
def test_reshard_function_checks_tp_before_writing(tp2, tmp_path, tp):
    out = _copy(tp2, tmp_path, "existing")
    before = _snapshot(out)
    with pytest.raises(ReshardError, match="integer >= 1"):
        checkpoint_tools.reshard(tp2, out, tp)
    assert _snapshot(out) == before


def _run_cli(argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exited:
        status = exited.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err


def test_cli_output_paths_checked_before_writing(tp2, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    busy = tmp_path / "notes"
    busy.mkdir()
    (busy / "todo.txt").write_text("mine")
    before = _snapshot(tp2)
    cases = [
        (["reshard", tp2, str(a_file), "--tp", "1"], "is a file"),
        (["merge", tp2, str(a_file)], "is a file"),
        (["reshard", tp2, tp2, "--tp", "1"], "being read"),
        (["merge", tp2, tp2], "being read"),
        (["merge", tp2, os.path.join(tp2, "tp_rank_00")], "being read"),
        (["reshard", tp2, str(busy), "--tp", "1"], "todo.txt"),
        (["merge", tp2, str(busy)], "todo.txt"),
        (["merge", tp2, str(tmp_path / "m"), "--max-shard-size", "0"], "less than one byte"),
    ]
    for argv, message in cases:
        status, err = _run_cli(["checkpoint", *argv], capsys)
        assert status == 2, argv
        assert message in err, (argv, err)
    assert a_file.read_text() == "keep me"
    assert os.listdir(busy) == ["todo.txt"]
    assert not os.path.exists(tmp_path / "m")
    assert _snapshot(tp2) == before


def test_cli_inputs_that_are_not_checkpoints(tmp_path, capsys):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\x00" * 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    traced = tmp_path / "traced"
    (traced / "tp_rank_00").mkdir(parents=True)
    (traced / "traced_model.json").write_text("{}")
    for source, message in [(a_file, "a file, not a folder"), (tmp_path / "missing", "no such folder"),
                            (empty, "not a sharded checkpoint"), (traced, "parallel_model_load")]:
        for action in (["inspect", str(source)], ["verify", str(source)], ["merge", str(source), str(tmp_path / "o")],
                       ["reshard", str(source), str(tmp_path / "o"), "--tp", "1"]):
            status, err = _run_cli(["checkpoint", *action], capsys)
            assert status == 2, action
            assert message in err, (action, err)
    assert not os.path.exists(tmp_path / "o")


def test_failed_reshard_keeps_the_old_checkpoint_and_leaves_no_files(tp2, tmp_path, monkeypatch):
    out = _copy(tp2, tmp_path, "existing")
    before = _snapshot(out)
    write = fmt.write_shard_file

    def disk_full_on_rank_1(save_dir, tp_rank, *args):
        if tp_rank == 1:
            raise OSError(28, "No space left on device")
        return write(save_dir, tp_rank, *args)

    monkeypatch.setattr(fmt, "write_shard_file", disk_full_on_rank_1)
    with pytest.raises(OSError, match="No space"):
        checkpoint_tools.reshard(tp2, out, 2)
    assert _snapshot(out) == before
    monkeypatch.undo()
    checkpoint_tools.reshard(tp2, out, 1)
    assert sorted(os.listdir(out)) == ["manifest.json", "tp_rank_00"]
    assert len(os.listdir(os.path.join(out, "tp_rank_00"))) == 1


# ---------------------------------------------------------------- the manifest against its files


def _case_load_unchanged_on_every_rank(save_dir: str):
    """(the error this rank's load raised, the parameters it changed anyway)."""
    torch.manual_seed(SEED + 1)
    model = Net(parallel=True)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    try:
        load(save_dir, model=model)
        raised = None
    except Exception as error:  # noqa: BLE001 - its type and message are the result
        raised = (type(error).__name__, str(error))
    return raised, [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]


def test_a_rank_file_that_disagrees_with_the_manifest_changes_no_model(pools, tp2, tmp_path):
    """Rank 1's file holds other shapes (a forger kept the rank, save id and checksums right): no rank loads."""
    other = str(tmp_path / "other")
    pools.run(2, 2, _case_save_model, other, 2 * FFN)
    forged = _copy(tp2, tmp_path, "forged")
    target = os.path.join(forged, _manifest(forged)["files"][1]["path"])
    shutil.copyfile(os.path.join(other, _manifest(other)["files"][1]["path"]), target)
    _rewrite_shard(target, **{"nxd.save_id": _manifest(forged)["save_id"]})
    _record_files(forged)
    for (error_type, message), changed in pools.run(2, 2, _case_load_unchanged_on_every_rank, forged):
        assert changed == []
        assert error_type == "CheckpointCorruptError" and "mlp.fc1.weight" in message, message


def _flip_byte_of(folder: str, rank: int, name: str, at: int = 0) -> None:
    """Flip a bit of byte `at` of tensor `name` in TP rank `rank`'s shard file of the checkpoint at `folder`."""
    manifest = fmt.read_manifest(folder)
    offset, nbytes = fmt.check_shard_file(folder, manifest, rank).byte_span(name)
    assert 0 <= at < nbytes
    with open(os.path.join(folder, manifest.files[rank].path), "r+b") as file:
        file.seek(offset + at)
        byte = file.read(1)[0]
        file.seek(offset + at)
        file.write(bytes([byte ^ 0x04]))


@pytest.mark.parametrize("rank,name", [
    (0, "model/norm.weight"),  # replicated, stored once in TP rank 0's file: TP rank 1 reads it from there
    (1, "model/mlp.fc1.weight"),  # TP rank 1's shard
    (0, "model/embed.weight"),  # TP rank 0's shard
])
def test_damage_in_a_tensor_that_a_rank_reads_changes_no_model(pools, tp2, tmp_path, rank, name):
    damaged = _copy(tp2, tmp_path, "damaged")
    _flip_byte_of(damaged, rank, name, at=5)
    for (error_type, message), changed in pools.run(2, 2, _case_load_unchanged_on_every_rank, damaged):
        assert changed == []
        assert error_type == "CheckpointCorruptError" and name in message and f"tp_rank_0{rank}" in message, message
    assert main(["checkpoint", "verify", damaged]) == 1


def test_a_rank_verifies_the_tensors_it_reads_from_another_ranks_file(tp2, tmp_path):
    """TP rank 1 reads the replicated tensors that TP rank 0's file holds, and checks each of them, but not rank 0's
    shards, which it does not read."""
    from neuronx_distributed.parallel_layers.sharded_source import ShardedSource

    damaged = _copy(tp2, tmp_path, "damaged")
    _flip_byte_of(damaged, 0, "model/norm.weight")
    _flip_byte_of(damaged, 0, "model/mlp.fc1.weight")
    rank_1 = ShardedSource(damaged, fmt.read_manifest(damaged), 1, 2)
    rank_1.verify(["model/mlp.fc1.weight", "model/mlp.fc1.bias"])  # its own shards: intact
    with pytest.raises(CheckpointCorruptError, match=r"tp_rank_00.*'model/norm\.weight' has crc32"):
        rank_1.verify(["model/mlp.fc1.weight", "model/norm.weight"])


def _case_load_epoch(save_dir: str):
    return load(save_dir, model=Net(parallel=True))["epoch"]


def test_damage_in_a_shard_files_header_is_caught_on_every_rank(pools, tp2, tmp_path):
    """The header (the state beside the tensors: here the epoch) is checked too: its crc32, with the tensors'
    recorded ones, must give the file's."""
    damaged = _copy(tp2, tmp_path, "damaged")
    path = os.path.join(damaged, _manifest(damaged)["files"][1]["path"])
    with open(path, "rb") as file:
        data = file.read()
    assert data.count(b'"epoch') == 1
    at = data.index(b"3", data.index(b'"epoch'))  # the saved epoch, 3, in TP rank 1's state structure
    with open(path, "wb") as file:
        file.write(data[:at] + b"4" + data[at + 1:])
    assert pools.run(2, 2, _case_load_epoch, tp2) == [3, 3]
    for (error_type, message), changed in pools.run(2, 2, _case_load_unchanged_on_every_rank, damaged):
        assert changed == []
        assert error_type == "CheckpointCorruptError" and "tp_rank_01" in message and "header" in message, message


def test_shard_files_swapped_with_their_checksums_are_refused(tp2, tmp_path):
    swapped = _copy(tp2, tmp_path, "swapped")
    raw = _manifest(swapped)
    first, second = (os.path.join(swapped, entry["path"]) for entry in raw["files"])
    os.rename(first, first + ".x")
    os.rename(second, first)
    os.rename(first + ".x", second)
    raw["files"][0]["bytes"], raw["files"][1]["bytes"] = raw["files"][1]["bytes"], raw["files"][0]["bytes"]
    raw["files"][0]["crc32"], raw["files"][1]["crc32"] = raw["files"][1]["crc32"], raw["files"][0]["crc32"]
    _write_manifest(swapped, raw)
    with pytest.raises(CheckpointCorruptError, match="written as TP rank 1 .* lists it as TP rank 0"):
        load(swapped)
    assert main(["checkpoint", "verify", swapped]) == 1


def test_a_shard_file_from_another_save_is_refused(pools, tp2, tmp_path):
    other = str(tmp_path / "other")
    pools.run(2, 2, _case_save_model, other)  # the same model, saved again: same tensors, another save id
    mixed = _copy(tp2, tmp_path, "mixed")
    shutil.copyfile(os.path.join(other, _manifest(other)["files"][1]["path"]),
                    os.path.join(mixed, _manifest(mixed)["files"][1]["path"]))
    _record_files(mixed)
    with pytest.raises(CheckpointCorruptError, match="of save"):
        checkpoint_tools.merge(mixed, str(tmp_path / "merged"))


def _case_extra_key_on_one_rank(save_dir: str):
    """TP rank 0 saves a tensor beyond the model that rank 1 does not: only rank 0's load returns a tensor."""
    extra = {"rank_0_only": torch.arange(5)} if parallel_state.get_tensor_model_parallel_rank() == 0 else {}
    _case_save_model(save_dir, extra=extra)
    torch.manual_seed(SEED + 1)
    model = Net(parallel=True)
    rest = load(save_dir, model=model)
    return sorted(rest), rest.get("rank_0_only")


def test_ranks_agree_on_taking_turns(pools, tmp_path):
    """Whether ranks take turns is decided from every rank's need, so all of them enter the same collectives."""
    results = pools.run(2, 2, _case_extra_key_on_one_rank, str(tmp_path / "uneven"), timeout=90)
    assert results[0][0] == ["epoch", "rank_0_only"] and torch.equal(results[0][1], torch.arange(5))
    assert results[1] == (["epoch"], None)


def _case_per_rank_shapes(save_dir: str):
    """Each TP rank saves its own value of another shape; each gets its own back."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    _case_save_model(save_dir, extra={"mine": torch.full((rank + 1,), float(rank))})
    return load(save_dir, model=Net(parallel=True))["mine"]


def test_per_rank_values_of_different_shapes_load(pools, tmp_path):
    """A per-rank ('local') tensor may differ in shape between rank files; the header check allows that."""
    mine = pools.run(2, 2, _case_per_rank_shapes, str(tmp_path / "local"))
    assert torch.equal(mine[0], torch.zeros(1)) and torch.equal(mine[1], torch.ones(2))


# ---------------------------------------------------------------- manifest file entries


def _point_rank_0_at(folder: str, target_path: str, manifest_path: str) -> None:
    raw = _manifest(folder)
    crc, size = fmt.checksum_file(target_path)
    raw["files"][0].update(path=manifest_path, bytes=size, crc32=crc)
    _write_manifest(folder, raw)


def test_file_entries_outside_the_folder_are_refused(tp2, tmp_path):
    outside = str(tmp_path / "outside.safetensors")
    base = _copy(tp2, tmp_path, "base")
    shutil.copyfile(os.path.join(base, _manifest(base)["files"][0]["path"]), outside)
    for name, manifest_path in [("absolute", outside), ("dotdot", os.path.relpath(outside, str(tmp_path / "dotdot")))]:
        folder = _copy(tp2, tmp_path, name)
        _point_rank_0_at(folder, outside, manifest_path)
        with pytest.raises(CheckpointCorruptError, match=r"files\[0\]\.path"):
            load(folder)
    linked = _copy(tp2, tmp_path, "linked")
    own = os.path.join(linked, _manifest(linked)["files"][0]["path"])
    os.remove(own)
    os.symlink(outside, own)
    with pytest.raises(CheckpointCorruptError, match="outside the checkpoint folder"):
        load(linked)


def _case_load_fifo_entry(folder: str):
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        load(folder)
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        load(folder, verify=False)
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        checkpoint_tools.verify(folder)


def test_fifo_entry_does_not_hang(pools, tp2, tmp_path):
    folder = _copy(tp2, tmp_path, "fifo")
    own = os.path.join(folder, _manifest(folder)["files"][1]["path"])
    os.remove(own)
    os.mkfifo(own)
    pools.run(1, 1, _case_load_fifo_entry, folder, timeout=60)


def test_file_longer_or_shorter_than_recorded(tp2, tmp_path):
    longer = _copy(tp2, tmp_path, "longer")
    with open(os.path.join(longer, _manifest(longer)["files"][0]["path"]), "ab") as file:
        file.write(b"\x00" * 100)
    shorter = _copy(tp2, tmp_path, "shorter")
    path = os.path.join(shorter, _manifest(shorter)["files"][0]["path"])
    os.truncate(path, os.path.getsize(path) - 100)
    for folder in (longer, shorter):
        for verify in (True, False):
            with pytest.raises(CheckpointCorruptError, match="bytes but the manifest records"):
                load(folder, verify=verify)


# ---------------------------------------------------------------- the manifest's schema


_MUTATIONS = [
    (lambda raw: raw.pop("files"), "lacks \\['files'\\]"),
    (lambda raw: raw.update(tensor_parallel_size=0), "tensor_parallel_size"),
    (lambda raw: raw.update(tensor_parallel_size="2"), "tensor_parallel_size"),
    (lambda raw: raw.update(tensor_parallel_size=True), "tensor_parallel_size"),
    (lambda raw: raw.update(tensor_parallel_size=3), "files has 2 entries"),
    (lambda raw: raw.update(files={"0": 1}), "files has dict entries"),
    (lambda raw: raw["files"].__setitem__(0, "tp_rank_00"), r"files\[0\] is a str"),
    (lambda raw: raw["files"][0].update(bytes=-5), r"files\[0\]\.bytes"),
    (lambda raw: raw["files"][1].update(crc32=12), r"files\[1\]\.crc32"),
    (lambda raw: raw["files"][1].pop("crc32"), r"files\[1\] lacks"),
    (lambda raw: raw.update(save_id="../x"), "save_id"),
    (lambda raw: raw.update(model_key=["model"]), "model_key"),
    (lambda raw: raw.update(tensors=[]), "tensors is a list"),
    (lambda raw: raw["tensors"]["model/norm.weight"].update(dtype="float33"), r"norm\.weight.*\.dtype"),
    (lambda raw: raw["tensors"]["model/norm.weight"].update(dtype=None), r"norm\.weight.*\.dtype"),
    (lambda raw: raw["tensors"]["model/norm.weight"].update(shape=[-1]), r"norm\.weight.*\.shape"),
    (lambda raw: raw["tensors"]["model/norm.weight"].update(shape="16"), r"norm\.weight.*\.shape"),
    (lambda raw: raw["tensors"]["model/norm.weight"].update(layout="mirrored"), r"norm\.weight.*\.layout"),
    (lambda raw: raw["tensors"]["model/norm.weight"].pop("layout"), r"norm\.weight.*lacks"),
    (lambda raw: raw["tensors"]["model/mlp.fc1.weight"].update(partition_dim=2), r"fc1\.weight.*partition_dim"),
    (lambda raw: raw["tensors"]["model/mlp.fc1.weight"].update(partition_stride=0), r"fc1\.weight.*partition_stride"),
    (lambda raw: raw["tensors"]["model/mlp.fc1.weight"].update(shape=[31, 16]), r"fc1\.weight.*cannot have written"),
    (lambda raw: raw.update(surprise=1), "unknown fields \\['surprise'\\]"),
    (lambda raw: raw.update(extra=None), "extra"),
    (lambda raw: raw.update(version="1"), "upgrade neuronx_distributed"),
]


@pytest.mark.parametrize("mutate,message", _MUTATIONS, ids=[str(index) for index in range(len(_MUTATIONS))])
def test_malformed_manifest_fields_named(tp2, tmp_path, capsys, mutate, message):
    folder = _copy(tp2, tmp_path, "malformed")
    raw = _manifest(folder)
    mutate(raw)
    _write_manifest(folder, raw)
    with pytest.raises(CheckpointCorruptError, match=message):
        load(folder)
    status, err = _run_cli(["checkpoint", "inspect", folder], capsys)
    assert status == 2 and "manifest" in err


def test_manifest_not_json_or_not_a_regular_file(tp2, tmp_path):
    broken = _copy(tp2, tmp_path, "broken")
    (tmp_path / "broken" / "manifest.json").write_bytes(b"{\"format\": ")
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        load(broken)
    (tmp_path / "broken" / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        load(broken)
    os.remove(tmp_path / "broken" / "manifest.json")
    os.mkdir(tmp_path / "broken" / "manifest.json")
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        load(broken)


def test_traced_model_folder_gets_pointed_to_parallel_model_load(tmp_path):
    traced = tmp_path / "traced"
    (traced / "tp_rank_00").mkdir(parents=True)
    (traced / "traced_model.json").write_text("{}")
    with pytest.raises(TracedModelFolderError, match="trace.parallel_model_load"):
        load(str(traced))


def test_load_arguments_checked(tp2):
    for kwargs, message in [({"model": "model"}, "torch.nn.Module"), ({"model_key": 3}, "model_key"),
                            ({"strict": "no"}, "strict"), ({"verify": None}, "verify"), ({"sharded": 1}, "sharded")]:
        with pytest.raises(CheckpointArgumentError, match=message):
            load(tp2, **kwargs)
    with pytest.raises(CheckpointError):
        load(12345)


# ---------------------------------------------------------------- state dicts that lost their sharding


def _case_save_copied_state(save_dir: str, how: str):
    torch.manual_seed(SEED)
    model = Net(parallel=True)
    state = model.state_dict()
    copied = {key: value.clone() for key, value in state.items()} if how == "clone" else \
        {key: value.bfloat16() for key, value in state.items()}
    with pytest.raises(ReplicatedMismatchError, match="copied or cast"):
        save({"model": copied}, save_dir)
    return sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []


@pytest.mark.parametrize("how", ["clone", "bfloat16"])
def test_copied_or_cast_state_dict_is_refused_on_every_rank(pools, tmp_path, how):
    listings = pools.run(2, 2, _case_save_copied_state, str(tmp_path / how), how)
    assert all("manifest.json" not in listing for listing in listings)


def _case_save_replicated_model(save_dir: str):
    torch.manual_seed(SEED)
    model = Net(parallel=False)  # no TP layers: every tensor is the same on both TP ranks
    save({"model": model.state_dict()}, save_dir)


def test_a_model_without_tp_layers_still_saves_and_merges(pools, tmp_path):
    pools.run(2, 2, _case_save_replicated_model, str(tmp_path / "plain"))
    files = checkpoint_tools.merge(str(tmp_path / "plain"), str(tmp_path / "merged"))
    torch.manual_seed(SEED)
    reference = Net(parallel=False).state_dict()
    with safe_open(str(tmp_path / "merged" / files[0]), framework="pt") as file:
        assert all(torch.equal(file.get_tensor(key), value) for key, value in reference.items())


def test_merge_refuses_replicated_tensors_that_differ_between_files(tp2, tmp_path):
    """A rank file whose 'replicated' tensor differs in value (or shape) from rank 0's: no merged value is right.

    The save wrote the tensor once (TP rank 0's file); the forged checkpoint stores a copy per file, as format
    version 1 does (its manifest entry no longer names one file), or keeps the entry and adds a copy (refused:
    a file holds a tensor the manifest places in another).
    """
    norm = torch.ones(16)
    for name, change, error, per_file in [
        ("value", lambda tensors: {**tensors, "model/norm.weight": norm + 1}, ReplicatedMismatchError, True),
        ("shape", lambda tensors: {**tensors, "model/norm.weight": torch.ones(8)}, CheckpointCorruptError, True),
        ("extra", lambda tensors: {**tensors, "model/norm.weight": norm}, CheckpointCorruptError, False),
    ]:
        folder = _copy(tp2, tmp_path, name)
        raw = _manifest(folder)
        assert raw["tensors"]["model/norm.weight"].pop("file") == 0  # written once, by TP rank 0
        with safe_open(os.path.join(folder, raw["files"][0]["path"]), framework="pt") as file:
            norm = file.get_tensor("model/norm.weight")
        if per_file:
            _write_manifest(folder, raw)
        _rewrite_shard(os.path.join(folder, raw["files"][1]["path"]), change)
        _record_files(folder)
        with pytest.raises(error, match="norm.weight"):
            checkpoint_tools.merge(folder, str(tmp_path / f"merged_{name}"))
        assert not os.path.exists(tmp_path / f"merged_{name}")


# ---------------------------------------------------------------- concurrent and failed saves


def _case_save_slowly(save_dir: str, writing: str, go: str):
    """Save, with rank 0 pausing after its shard is written until `go` exists."""
    from neuronx_distributed.parallel_layers import checkpointing

    write = checkpointing.fmt.write_shard_file

    def write_then_wait(*args):
        entry = write(*args)
        if torch.distributed.get_rank() == 0:
            open(writing, "w").close()
            deadline = time.monotonic() + 60
            while not os.path.exists(go):
                assert time.monotonic() < deadline, "the test never let the save go on"
                time.sleep(0.01)
        return entry

    checkpointing.fmt.write_shard_file = write_then_wait
    try:
        _case_save_model(save_dir)
    finally:
        checkpointing.fmt.write_shard_file = write


def test_concurrent_save_to_one_folder_is_refused(pools, tp2, tmp_path):
    """A second save while one is writing raises CheckpointBusyError; the first finishes and loads."""
    save_dir, writing, go = str(tmp_path / "shared"), str(tmp_path / "writing"), str(tmp_path / "go")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=_try(lambda: pools.run(2, 2, _case_save_slowly, save_dir, writing, go, timeout=120))))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(writing) and thread.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        torch.manual_seed(SEED)
        with pytest.raises(CheckpointBusyError, match="right now"):
            save({"model": Net(parallel=False).state_dict()}, save_dir)
        with pytest.raises(CheckpointBusyError, match="right now"):
            checkpoint_tools.reshard(tp2, save_dir, 1)
    finally:
        open(go, "w").close()
        thread.join()
    assert not isinstance(outcome["result"], BaseException), outcome["result"]
    assert load(save_dir)["epoch"] == 3
    assert not os.path.exists(os.path.join(save_dir, fmt.SAVE_LOCK_NAME))


def _try(fn):
    try:
        return fn()
    except BaseException as error:  # noqa: BLE001 - handed to the main thread
        return error


def _case_failed_save_then_save(save_dir: str):
    from neuronx_distributed.parallel_layers import checkpointing

    write = checkpointing.fmt.write_shard_file

    def full_disk_on_rank_1(*args):
        entry = write(*args)
        if parallel_state.get_tensor_model_parallel_rank() == 1:
            raise OSError(28, "No space left on device")
        return entry

    checkpointing.fmt.write_shard_file = full_disk_on_rank_1
    try:
        with pytest.raises(CheckpointSaveError, match="No space"):
            _case_save_model(save_dir)
    finally:
        checkpointing.fmt.write_shard_file = write
    torch.distributed.barrier()  # every rank is done with the failed save
    left = sorted(os.path.join(root, name) for root, _, names in os.walk(save_dir) for name in names)
    torch.distributed.barrier()
    _case_save_model(save_dir)
    return left


def test_failed_save_leaves_no_files_and_the_next_save_works(pools, tmp_path):
    save_dir = str(tmp_path / "retry")
    left = pools.run(2, 2, _case_failed_save_then_save, save_dir)
    assert left[0] == []
    manifest = fmt.read_manifest(save_dir)
    assert sorted(os.listdir(save_dir)) == ["manifest.json", "tp_rank_00", "tp_rank_01"]
    for entry in manifest.files:
        assert os.listdir(os.path.join(save_dir, os.path.dirname(entry.path))) == [os.path.basename(entry.path)]


def _case_save_into_a_file(path: str):
    with pytest.raises(CheckpointArgumentError, match="is a file"):
        save({"model": Net(parallel=True).state_dict()}, path)


def test_save_into_a_file_raises_on_every_rank(pools, tmp_path):
    (tmp_path / "a_file").write_text("x")
    pools.run(2, 2, _case_save_into_a_file, str(tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "x"


# ---------------------------------------------------------------- unsharded checkpoints that users bring


def test_hf_index_naming_a_file_outside_its_folder_is_refused(tmp_path):
    torch.manual_seed(SEED)
    state = Net(parallel=False).state_dict()
    save_file(state, str(tmp_path / "outside.safetensors"), metadata={"format": "pt"})
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(state, "../outside.safetensors")}))
    torch.manual_seed(0)
    model = Net(parallel=False)
    with pytest.raises(CheckpointCorruptError, match="outside"):
        load(str(folder), model=model, sharded=False)
    (folder / "model.safetensors.index.json").write_text("{\"weight_map\": [1]}")
    with pytest.raises(CheckpointCorruptError, match="not a valid safetensors index"):
        load(str(folder), model=model, sharded=False)


def _case_load_unsharded_fifo(path: str):
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        load(path, model=Net(parallel=True), sharded=False)


def test_unsharded_fifo_does_not_hang(pools, tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    pools.run(1, 1, _case_load_unsharded_fifo, str(tmp_path / "model.safetensors"), timeout=60)
    pools.run(1, 1, _case_load_unsharded_fifo, str(tmp_path), timeout=60)  # the HF folder form


def test_unsharded_garbage_files_raise_typed_errors(tmp_path):
    model = Net(parallel=False)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("bad.safetensors", "bad.pt", "empty.pt"):
        with pytest.raises(CheckpointCorruptError, match="not a readable"):
            load(str(tmp_path / name), model=model, sharded=False)


def test_tensors_safetensors_cannot_hold_are_refused_before_writing(tmp_path):
    for value in (torch.zeros(2, dtype=torch.complex128), torch.eye(2).to_sparse()):
        with pytest.raises(UnsafeCheckpointError, match="safetensors cannot hold"):
            save({"model": {"w": value}}, str(tmp_path / "odd"))
        assert os.listdir(tmp_path / "odd") == []

"""Sharded optimizer checkpoints (`optimizer.checkpoint`): resume exactly, at other DP sizes, into plain optimizers.

Training is `test_zero1`'s: the TP model trains on its DP slice of each batch, the
unsharded reference on the whole batch with the plain optimizer and clip_grad_norm_.
A run saves the model (`parallel_layers.save`) and the optimizer after 5 steps; a
resumed run (another pool: another DP size, or a plain optimizer) loads both and
trains 5 more, and must end where the reference does after 10 steps.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_zero1 import _check_shards, _data, _loss, _models, _train

from neuronx_distributed.errors import UnsafeCheckpointError
from neuronx_distributed.optimizer import NeuronZero1Optimizer, load_optimizer_state, save_optimizer_state
from neuronx_distributed.optimizer import checkpoint as optim_checkpoint
from neuronx_distributed.parallel_layers import checkpointing

HYPER = dict(lr=2e-2, weight_decay=0.1)
MAX_NORM = 0.5
SAVED_AT, STEPS = 5, 10
RESUME_TOL = dict(rtol=1e-6, atol=1e-6)


def _zero1(model, dtype=torch.float32):
    return NeuronZero1Optimizer(model.parameters(), torch.optim.AdamW, optimizer_dtype=dtype, max_norm=MAX_NORM, **HYPER)


def _reference_after(steps: int):
    """The unsharded model after `steps` steps of AdamW on the whole batch, clipped to MAX_NORM."""
    reference, _ = _models()
    optimizer = torch.optim.AdamW(reference.parameters(), **HYPER)
    for step in range(steps):
        x, y = _data(step)
        optimizer.zero_grad()
        _loss(reference, x, y).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        optimizer.step()
    return reference


def _plain_step(model, optimizer, step: int):
    """One step of a plain optimizer on one rank holding the whole model (DP=1, TP=1)."""
    x, y = _data(step)
    optimizer.zero_grad()
    _loss(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()


def _case_save_after_5(folder: str):
    _, model = _models()
    optimizer = _zero1(model)
    _train(model, optimizer, range(SAVED_AT))
    checkpointing.save(model.state_dict(), os.path.join(folder, "model"), model_key=None)
    optimizer.save_sharded_state_dict(os.path.join(folder, "optim"))


def _case_resume(folder: str, kind: str):
    """Load the model and optimizer saved after 5 steps, train to 10; the model must equal the reference's."""
    _, model = _models()
    checkpointing.load(os.path.join(folder, "model"), model=model, model_key=None)
    if kind == "zero1":
        optimizer = _zero1(model)
        optimizer.load_sharded_state_dict(os.path.join(folder, "optim"))
        _train(model, optimizer, range(SAVED_AT, STEPS))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
        load_optimizer_state(optimizer, os.path.join(folder, "optim"))
        for step in range(SAVED_AT, STEPS):
            _plain_step(model, optimizer, step)
    _check_shards(model, _reference_after(STEPS), **RESUME_TOL)


def _case_round_trip(folder: str, dtype_name: str):
    """Save after 5 steps, train 5 more; a fresh optimizer loaded from the save ends bit-equal."""
    dtype = getattr(torch, dtype_name)
    _, model = _models(dtype)
    optimizer = _zero1(model)
    _train(model, optimizer, range(SAVED_AT))
    optimizer.save_sharded_state_dict(folder)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, optimizer, range(SAVED_AT, STEPS))

    _, resumed = _models(dtype)
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            p.copy_(saved[name])
    resumed_optimizer = _zero1(resumed)
    resumed_optimizer.load_sharded_state_dict(folder)
    _train(resumed, resumed_optimizer, range(SAVED_AT, STEPS))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    for mine, theirs in zip(optimizer.state_dict()["master_weights"], resumed_optimizer.state_dict()["master_weights"]):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("world_size,tp,dtype_name", [(2, 1, "float32"), (4, 2, "bfloat16")])
def test_round_trip_resumes_bit_exact(pools, tmp_path, world_size, tp, dtype_name):
    pools.run(world_size, tp, _case_round_trip, str(tmp_path), dtype_name)
    manifest = json.loads((tmp_path / optim_checkpoint.MANIFEST_NAME).read_text())
    assert (manifest["tensor_parallel_size"], manifest["data_parallel_size"]) == (tp, world_size // tp)
    assert manifest["masters"] == "float32"
    assert len(manifest["files"]) == world_size


def test_dp2_checkpoint_resumes_at_dp4_dp1_and_in_plain_optimizer(pools, tmp_path):
    pools.run(2, 1, _case_save_after_5, str(tmp_path))
    pools.run(4, 1, _case_resume, str(tmp_path), "zero1")
    pools.run(1, 1, _case_resume, str(tmp_path), "zero1")
    pools.run(1, 1, _case_resume, str(tmp_path), "plain")


def _case_plain_save_after_5(folder: str):
    _, model = _models()
    optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
    for step in range(SAVED_AT):
        _plain_step(model, optimizer, step)
    checkpointing.save(model.state_dict(), os.path.join(folder, "model"), model_key=None)
    save_optimizer_state(optimizer, os.path.join(folder, "optim"))


def test_plain_optimizer_checkpoint_resumes_in_zero1_at_dp2(pools, tmp_path):
    pools.run(1, 1, _case_plain_save_after_5, str(tmp_path))
    pools.run(2, 1, _case_resume, str(tmp_path), "zero1")


def _case_load_expecting(folder: str, model_kind: str):
    """Try to load; return the error type's name and whether the optimizer's state stayed as it was."""
    _, model = _models()
    if model_kind == "wider":
        model.scale = torch.nn.Parameter(torch.ones(model.scale.numel() + 1))
    elif model_kind == "extra":
        model.extra = torch.nn.Parameter(torch.ones(3))
    optimizer = _zero1(model)
    for param in model.parameters():  # one step gives the optimizer state to keep (the model's forward may not fit)
        param.grad = torch.full_like(param, 0.01)
    optimizer.step()
    before = optimizer.state_dict()
    try:
        optimizer.load_sharded_state_dict(folder)
        outcome = "nothing"
    except Exception as error:  # noqa: BLE001 - the test reports the type
        outcome = type(error).__name__
    after = optimizer.state_dict()
    unchanged = all(torch.equal(m, n) for m, n in zip(before["master_weights"], after["master_weights"])) and all(
        torch.equal(before["state"][i][k], after["state"][i][k]) for i in before["state"] for k in before["state"][i]
    ) and before["param_groups"] == after["param_groups"]
    return outcome, unchanged


def _case_save_only(folder: str):
    _, model = _models()
    optimizer = _zero1(model)
    _train(model, optimizer, range(2))
    optimizer.save_sharded_state_dict(folder)


def test_tp2_dp2_resumes_at_dp1_and_refuses_another_tp_degree(pools, tmp_path):
    pools.run(4, 2, _case_save_after_5, str(tmp_path))
    pools.run(2, 2, _case_resume, str(tmp_path), "zero1")  # TP=2 x DP=1
    results = pools.run(2, 1, _case_load_expecting, str(tmp_path / "optim"), "same")
    assert results == [("ReshardError", True)] * 2


def test_damaged_or_foreign_checkpoints_raise_and_change_nothing(pools, tmp_path):
    pools.run(2, 1, _case_save_only, str(tmp_path))

    # Another model: a parameter of another shape, or one parameter more.
    for model_kind in ("wider", "extra"):
        assert pools.run(2, 1, _case_load_expecting, str(tmp_path), model_kind) == [("CheckpointShapeError", True)] * 2

    # A killed save leaves unreferenced files (and a manifest aside): the checkpoint still loads.
    stray = tmp_path / optim_checkpoint.file_name(0, 0, "ab12")
    stray.write_bytes(b"partial")
    (tmp_path / (stray.name + ".tmp")).write_bytes(b"partial")
    (tmp_path / f"{optim_checkpoint.MANIFEST_NAME}.ab12.tmp").write_text("{")
    assert pools.run(2, 1, _case_load_expecting, str(tmp_path), "same") == [("nothing", False)] * 2
    pools.run(2, 1, _case_save_only, str(tmp_path))  # the next save removes them
    manifest = json.loads((tmp_path / optim_checkpoint.MANIFEST_NAME).read_text())
    files = [tmp_path / entry["path"] for entry in manifest["files"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([optim_checkpoint.MANIFEST_NAME] + [f.name for f in files])

    # One flipped byte in rank 1's file, then the file truncated: every rank raises, nothing changes.
    original = files[1].read_bytes()
    damaged = bytearray(original)
    damaged[-3] ^= 0x40
    files[1].write_bytes(bytes(damaged))
    assert pools.run(2, 1, _case_load_expecting, str(tmp_path), "same") == [("CheckpointCorruptError", True)] * 2
    files[1].write_bytes(original[:-8])
    assert pools.run(2, 1, _case_load_expecting, str(tmp_path), "same") == [("CheckpointCorruptError", True)] * 2
    files[1].write_bytes(original)

    # A damaged manifest, then none (a first save killed before its manifest).
    manifest_path = tmp_path / optim_checkpoint.MANIFEST_NAME
    text = manifest_path.read_text()
    edited = json.loads(text)
    edited["files"][1]["ranges"][0][0] += 1  # rank 1's chunk of parameter 0 no longer follows rank 0's
    manifest_path.write_text(json.dumps(edited))
    assert pools.run(2, 1, _case_load_expecting, str(tmp_path), "same") == [("CheckpointCorruptError", True)] * 2
    manifest_path.write_text(text[: len(text) // 2])
    assert pools.run(2, 1, _case_load_expecting, str(tmp_path), "same") == [("CheckpointCorruptError", True)] * 2
    manifest_path.unlink()
    assert pools.run(2, 1, _case_load_expecting, str(tmp_path), "same") == [("IncompleteCheckpointError", True)] * 2


def _case_unsavable_state():
    """State our format cannot hold (a tensor hyperparameter on one rank) fails the save on every rank."""
    _, model = _models()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if torch.distributed.get_rank() == 1:
        optimizer.param_groups[0]["lr"] = torch.tensor(0.1)
    return optimizer


def _case_save_refused(folder: str):
    try:
        save_optimizer_state(_case_unsavable_state(), folder)
        outcome = "nothing"
    except UnsafeCheckpointError:
        outcome = "UnsafeCheckpointError"
    torch.distributed.barrier()  # rank 0 has released its lock on the folder
    return outcome, sorted(os.listdir(folder))


def test_unsavable_state_raises_on_every_rank_and_writes_nothing(pools, tmp_path):
    for outcome, listing in pools.run(2, 1, _case_save_refused, str(tmp_path)):
        assert outcome == "UnsafeCheckpointError"
        assert listing == []


"""Checkpoints of a model on the test device: save, load and reshard, and unsharded files loaded into it.

A TP=2 model trained on the device is saved; each topology of the suite loads it
(resharding to its TP size) into a device model whose parameters and AdamW state
must equal the unsharded reference trained on the device, then saves and reloads
its own checkpoint over its own backend. Unsharded files (torch.save of a device
state dict, safetensors) load into a device model shard by shard.
"""

from __future__ import annotations

import os

import pytest
import torch
from models import expected_shard
from safetensors.torch import save_file
from test_checkpoint import SEED, Net, _full_gradients, _tp

from neuronx_distributed.parallel_layers import load, move_model_to_device, save

from .conftest import TOPOLOGIES, TOPOLOGY_IDS

TOL = dict(rtol=1e-6, atol=1e-6)


def _trained(parallel: bool, device: str, steps: int = 2):
    """Net on the device after `steps` AdamW steps on (slices of) the same full gradients."""
    torch.manual_seed(SEED)
    model = move_model_to_device(Net(parallel), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for step in range(steps):
        full = _full_gradients(step)
        for name, param in model.named_parameters():
            param.grad = expected_shard(full[name], param, *_tp()).to(device)
        optimizer.step()
    return model, optimizer


def _assert_like_reference(model, optimizer_state: dict | None, device: str):
    reference, reference_optimizer = _trained(parallel=False, device=device)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.device.type == device, name
        torch.testing.assert_close(param.detach(), expected_shard(ref_params[name].detach(), param, *_tp()), **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if optimizer_state is None:
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    optimizer.load_state_dict(optimizer_state)
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            expected = expected_shard(reference_optimizer.state[ref_param][key], param, *_tp())
            torch.testing.assert_close(optimizer.state[param][key], expected, **TOL, msg=lambda m, k=(name, key): f"{k}: {m}")


def _case_save(save_dir: str, device: str):
    model, optimizer = _trained(parallel=True, device=device)
    save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 2}, save_dir)
    return sorted(os.listdir(save_dir))


def _case_load_reshard_and_round_trip(save_dir: str, own_dir: str, device: str):
    torch.manual_seed(SEED + 99)  # other weights, overwritten by the load
    model = move_model_to_device(Net(parallel=True), device)
    rest = load(save_dir, model=model)
    assert rest["step"] == 2
    _assert_like_reference(model, rest["optimizer"], device)
    save({"model": model.state_dict(), "optimizer": rest["optimizer"]}, own_dir)
    torch.manual_seed(SEED + 98)
    again = move_model_to_device(Net(parallel=True), device)
    _assert_like_reference(again, load(own_dir, model=again)["optimizer"], device)


@pytest.fixture(scope="module")
def saved_tp2(device_pools, device, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("gpu_ckpt") / "tp2")
    files = device_pools.run("gloo", 2, 2, _case_save, save_dir, device)[0]
    assert "tp_rank_00" in files and "tp_rank_01" in files
    return save_dir


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_device_checkpoint_loads_at_any_tp(device_pools, device, saved_tp2, tmp_path, backend, world_size, tp):
    device_pools.run(backend, world_size, tp, _case_load_reshard_and_round_trip, saved_tp2, str(tmp_path / "own"), device)


def _case_unsharded_into_device_model(paths: list[str], device: str):
    for path in paths:
        torch.manual_seed(SEED + 5)
        model = move_model_to_device(Net(parallel=True), device)
        assert load(path, model=model, sharded=False) is None
        _assert_like_reference(model, None, device)


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_unsharded_files_load_into_device_model(device_pools, device, tmp_path, backend, world_size, tp):
    reference, _ = _trained(parallel=False, device=device)
    state = reference.state_dict()  # tensors on the device
    torch.save({"model": state}, tmp_path / "device_state.pt")
    save_file({name: tensor.cpu() for name, tensor in state.items()}, tmp_path / "weights.safetensors")
    paths = [str(tmp_path / "device_state.pt"), str(tmp_path / "weights.safetensors")]
    device_pools.run(backend, world_size, tp, _case_unsharded_into_device_model, paths, device)

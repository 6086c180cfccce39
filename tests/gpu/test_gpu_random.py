"""The TP RNG tracker drives the test device's generator (the CUDA generator on a GPU).

Dropout on device tensors inside `fork()` draws from seed + 2718 + tp_rank (different
across a TP group, equal across DP replicas), outside it from `torch.manual_seed(seed)`'s
stream as if no fork had happened, and re-seeding replays both.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuronx_distributed import parallel_state
from neuronx_distributed.parallel_layers.random import get_rng_state_tracker, model_parallel_manual_seed

from .conftest import TOPOLOGIES, TOPOLOGY_IDS

SEED, SIZE = 1234, 256


def _mask(device: str) -> torch.Tensor:
    return (F.dropout(torch.ones(SIZE, device=device), p=0.5, training=True) == 0).cpu()


def _plain_masks(device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return _mask(device), _mask(device)


def _case_draws(device: str):
    tracker = get_rng_state_tracker()
    model_parallel_manual_seed(SEED)
    states = tracker.get_states()["model-parallel-rng"]
    outside_1 = _mask(device)
    with tracker.fork():
        inside_1 = _mask(device)
    outside_2 = _mask(device)
    with tracker.fork():
        inside_2 = _mask(device)
    model_parallel_manual_seed(SEED)
    replay_outside = _mask(device)
    with tracker.fork():
        replay_inside = _mask(device)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return dict(
        tp_rank=tp_rank,
        state_devices=sorted(states),
        drawn=(outside_1, outside_2, inside_1, inside_2, replay_outside, replay_inside),
        plain=_plain_masks(device, SEED),
        forked=_plain_masks(device, SEED + 2718 + tp_rank),
    )


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_fork_draws_from_the_device_generator(device_pools, device, backend, world_size, tp):
    results = device_pools.run(backend, world_size, tp, _case_draws, device)
    inside_by_tp_rank = {}
    for rank, result in enumerate(results):
        outside_1, outside_2, inside_1, inside_2, replay_outside, replay_inside = result["drawn"]
        assert result["state_devices"] == sorted({"cpu", device}), f"rank {rank}: the tracker keeps the {device} state"
        assert torch.equal(outside_1, result["plain"][0]) and torch.equal(outside_2, result["plain"][1]), f"rank {rank}"
        assert torch.equal(inside_1, result["forked"][0]) and torch.equal(inside_2, result["forked"][1]), f"rank {rank}"
        assert torch.equal(replay_outside, outside_1) and torch.equal(replay_inside, inside_1), f"rank {rank}"
        inside_by_tp_rank.setdefault(result["tp_rank"], []).append(inside_1)
    for masks in inside_by_tp_rank.values():
        assert all(torch.equal(mask, masks[0]) for mask in masks), "DP replicas of a TP rank draw alike"
    firsts = [masks[0] for masks in inside_by_tp_rank.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:]), "TP ranks draw differently"

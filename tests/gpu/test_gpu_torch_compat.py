"""The comm torch engine on a torch without the 2.13 collective names (the GPU image's torch 2.11).

Workers drop `all_gather_single` / `reduce_scatter_single` from torch.distributed, as
torch before 2.13 lacks them, reload the engine module, and run all_gather and
reduce_scatter on device tensors through it.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist

from neuronx_distributed.comm import engine

from .conftest import TOPOLOGIES, TOPOLOGY_IDS


def _case_collectives_without_the_new_names(device: str):
    saved = {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single") if hasattr(dist, name)}
    for name in saved:
        delattr(dist, name)
    try:
        importlib.reload(engine)
        assert engine._all_gather_single is dist.all_gather_into_tensor
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = torch.arange(4.0, device=device) + 10 * rank
        torch.testing.assert_close(engine.TorchEngine().all_gather(mine, dist.group.WORLD),
                                   torch.stack([torch.arange(4.0, device=device) + 10 * r for r in range(world)]))
        rows = torch.ones(world, 3, device=device) * (rank + 1)
        total = sum(range(1, world + 1))
        torch.testing.assert_close(engine.TorchEngine().reduce_scatter(rows, dist.ReduceOp.SUM, dist.group.WORLD),
                                   torch.full((3,), float(total), device=device))
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)
        importlib.reload(engine)


@pytest.mark.parametrize("backend,world_size,tp", [t for t in TOPOLOGIES if t[1] > 1],
                         ids=[i for t, i in zip(TOPOLOGIES, TOPOLOGY_IDS) if t[1] > 1])
def test_torch_engine_without_the_2_13_names(device_pools, device, backend, world_size, tp):
    device_pools.run(backend, world_size, tp, _case_collectives_without_the_new_names, device)

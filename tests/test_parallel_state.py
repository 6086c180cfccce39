"""The TP x DP topology, its getters, re-initialization and the single-process fallback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.distributed as dist

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import (
    ModelParallelAlreadyInitializedError,
    ModelParallelNotInitializedError,
    ParallelSizeError,
)
from neuronx_distributed.parallel_layers import ColumnParallelLinear


def _topology():
    return {
        "tp_size": parallel_state.get_tensor_model_parallel_size(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_size": parallel_state.get_data_parallel_size(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "tp_groups": parallel_state.get_tensor_model_parallel_group(as_list=True),
        "dp_groups": parallel_state.get_data_parallel_group(as_list=True),
        "tp_group_ranks": dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
        "dp_group_ranks": dist.get_process_group_ranks(parallel_state.get_data_parallel_group()),
        "aliases": (parallel_state.get_tensor_parallel_size(), parallel_state.get_data_parallel_world_size()),
        "src_rank": parallel_state.get_tensor_model_parallel_src_rank(),
    }


def test_topology_four_ranks_tp2(pools):
    results = pools.run(4, 2, _topology)
    for rank, got in enumerate(results):
        assert got["tp_groups"] == [[0, 1], [2, 3]]
        assert got["dp_groups"] == [[0, 2], [1, 3]]
        assert (got["tp_size"], got["dp_size"], got["aliases"]) == (2, 2, (2, 2))
        assert (got["tp_rank"], got["dp_rank"]) == (rank % 2, rank // 2)
        assert got["tp_group_ranks"] == got["tp_groups"][rank // 2]
        assert got["dp_group_ranks"] == got["dp_groups"][rank % 2]
        assert got["src_rank"] == rank - rank % 2


@pytest.mark.parametrize("tp,tp_groups,dp_groups", [(1, [[0], [1], [2], [3]], [[0, 1, 2, 3]]), (4, [[0, 1, 2, 3]], [[0], [1], [2], [3]])])
def test_topology_extremes(pools, tp, tp_groups, dp_groups):
    for got in pools.run(4, tp, _topology):
        assert (got["tp_groups"], got["dp_groups"]) == (tp_groups, dp_groups)


def _reinitialize_with_other_sizes():
    seen = []
    for tp in (2, 4, 1):
        parallel_state.initialize_model_parallel(tp)
        parallel_state.initialize_model_parallel(tp)  # same size again: a no-op
        with pytest.raises(ModelParallelAlreadyInitializedError, match="destroy_model_parallel"):
            parallel_state.initialize_model_parallel(3 - tp % 2)
        seen.append((parallel_state.get_tensor_model_parallel_size(), parallel_state.get_data_parallel_size()))
        parallel_state.destroy_model_parallel()
        assert not parallel_state.model_parallel_is_initialized()
    return seen


def test_destroy_then_reinitialize(pools):
    assert pools.get(4).run(_reinitialize_with_other_sizes) == [[(2, 2), (4, 1), (1, 4)]] * 4


def _uninitialized_use():
    assert not parallel_state.model_parallel_is_initialized()
    for getter in (parallel_state.get_tensor_model_parallel_rank, parallel_state.get_data_parallel_group):
        with pytest.raises(ModelParallelNotInitializedError, match="initialize_model_parallel"):
            getter()
    with pytest.raises(ModelParallelNotInitializedError):
        ColumnParallelLinear(4, 4)
    with pytest.raises(ParallelSizeError, match="does not divide the world size 4"):
        parallel_state.initialize_model_parallel(3)
    with pytest.raises(ParallelSizeError, match="positive int"):
        parallel_state.initialize_model_parallel(0)
    assert not parallel_state.model_parallel_is_initialized()


def test_uninitialized_and_bad_sizes(pools):
    pools.get(4).run(_uninitialized_use)


def test_single_process_fallback_without_launcher():
    """A plain `python script.py` (no torchrun) initializes a world of one."""
    script = (
        "from neuronx_distributed import parallel_state\n"
        "import torch\n"
        "parallel_state.initialize_model_parallel()\n"
        "from neuronx_distributed.parallel_layers import ColumnParallelLinear\n"
        "print(parallel_state.get_tensor_model_parallel_size(), parallel_state.get_data_parallel_size(),\n"
        "      ColumnParallelLinear(4, 6)(torch.ones(2, 4)).shape)\n"
    )
    env = {key: value for key, value in __import__("os").environ.items() if key not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "torch.Size([2,", "6])"]


def test_public_import_paths_of_the_seed_and_design():
    """Both spellings of parallel_state are one module, first import or not; every public name imports."""
    script = (
        "import neuronx_distributed.parallel_state as alias\n"
        "from neuronx_distributed.parallel_state import initialize_model_parallel\n"
        "import neuronx_distributed, neuronx_distributed.parallel_layers as pl\n"
        "from neuronx_distributed.parallel_layers import (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding,\n"
        "    save, load, clip_grad_norm, move_model_to_device, parallel_state, layers)\n"
        "from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear as C\n"
        "from neuronx_distributed.trace import parallel_model_trace, parallel_model_save, parallel_model_load\n"
        "from neuronx_distributed.comm import all_reduce, all_gather, reduce_scatter, broadcast, barrier\n"
        "assert alias is parallel_state is neuronx_distributed.parallel_state\n"
        "assert initialize_model_parallel is parallel_state.initialize_model_parallel and C is ColumnParallelLinear\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

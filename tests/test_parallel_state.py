"""The TP x DP topology, its getters, re-initialization, arguments that ranks disagree on, and the
single-process fallback."""

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
    UnsupportedParallelismError,
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
        "tp_replica_groups": parallel_state.get_tensor_model_parallel_replica_groups(),
        "dp_replica_groups": parallel_state.get_data_parallel_replica_groups(),
        "dp_src_rank": parallel_state.get_data_parallel_src_rank(),
        "world_group_ranks": dist.get_process_group_ranks(parallel_state.get_world_group()),
        "world_group_list": parallel_state.get_world_group(as_list=True),
        "pipeline": (
            parallel_state.get_pipeline_model_parallel_size(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_replica_groups(),
        ),
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
        # Upstream 2.x names: the whole mesh, the DP source, the world, and PP=1.
        assert (got["tp_replica_groups"], got["dp_replica_groups"]) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
        assert got["dp_src_rank"] == rank % 2 == got["dp_groups"][rank % 2][0]
        assert got["world_group_ranks"] == [0, 1, 2, 3] and got["world_group_list"] == [[0, 1, 2, 3]]
        assert got["pipeline"] == (1, 0, [[0], [1], [2], [3]])


@pytest.mark.parametrize("tp,tp_groups,dp_groups", [(1, [[0], [1], [2], [3]], [[0, 1, 2, 3]]), (4, [[0, 1, 2, 3]], [[0], [1], [2], [3]])])
def test_topology_extremes(pools, tp, tp_groups, dp_groups):
    for rank, got in enumerate(pools.run(4, tp, _topology)):
        assert (got["tp_groups"], got["dp_groups"]) == (tp_groups, dp_groups)
        assert (got["tp_replica_groups"], got["dp_replica_groups"]) == (tp_groups, dp_groups)
        assert got["dp_src_rank"] == dp_groups[rank % tp][0]


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


# A bound far above what the cases take: before the ranks compared their arguments, they hung here.
ANSWER_S = 60


def _outcome(fn) -> str:
    try:
        fn()
        return "returned"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        return f"{type(error).__name__}: {error}"


def _initialize_with_rank_dependent_sizes(sizes: list[int]) -> dict:
    rank = dist.get_rank()
    outcome = _outcome(lambda: parallel_state.initialize_model_parallel(sizes[rank]))
    initialized = parallel_state.model_parallel_is_initialized()
    parallel_state.initialize_model_parallel(2)  # nothing was left half-built: the right call works
    parallel_state.destroy_model_parallel()
    return {"outcome": outcome, "initialized": initialized}


@pytest.mark.parametrize(
    "sizes,expected",
    [
        ([2, 4, 2, 4], "tensor_model_parallel_size is 2 on ranks [0, 2]; 4 on ranks [1, 3]"),
        # Rank 3's size alone would raise there only (3 does not divide 4), leaving the others in new_group.
        ([2, 2, 2, 3], "tensor_model_parallel_size is 2 on ranks [0, 1, 2]; 3 on ranks [3]"),
    ],
)
def test_ranks_passing_different_sizes_all_raise_naming_each_value(pools, sizes, expected):
    for got in pools.get(4).run(_initialize_with_rank_dependent_sizes, sizes, timeout=ANSWER_S):
        assert got["outcome"].startswith("ParallelSizeError") and expected in got["outcome"], got["outcome"]
        assert not got["initialized"]


def _reinitialize_after_only_rank_1_destroyed() -> str:
    parallel_state.initialize_model_parallel(2)
    if dist.get_rank() == 1:
        parallel_state.destroy_model_parallel()
    # A no-op on rank 0, new groups on rank 1: it must raise on both instead of leaving rank 1 in new_group.
    outcome = _outcome(lambda: parallel_state.initialize_model_parallel(2))
    parallel_state.destroy_model_parallel()
    return outcome


def test_ranks_in_different_states_all_raise(pools):
    for got in pools.get(2).run(_reinitialize_after_only_rank_1_destroyed, timeout=ANSWER_S):
        assert got.startswith("ModelParallelAlreadyInitializedError"), got
        assert "initialized with tensor_model_parallel_size is 2 on ranks [0]; None on ranks [1]" in got, got


def _upstream_arguments() -> dict:
    outcomes = {
        "pipeline 2": _outcome(lambda: parallel_state.initialize_model_parallel(2, pipeline_model_parallel_size=2)),
        "context 2": _outcome(lambda: parallel_state.initialize_model_parallel(2, context_parallel_size=2)),
        "expert 2": _outcome(lambda: parallel_state.initialize_model_parallel(2, expert_model_parallel_size=2)),
        "pipeline 0": _outcome(lambda: parallel_state.initialize_model_parallel(2, pipeline_model_parallel_size=0)),
        "tensor True": _outcome(lambda: parallel_state.initialize_model_parallel(True)),
        "skip 'yes'": _outcome(lambda: parallel_state.initialize_model_parallel(2, skip_collective_init="yes")),
        "lnc 0": _outcome(lambda: parallel_state.initialize_model_parallel(2, lnc_size=0)),
    }
    with pytest.raises(UnsupportedParallelismError):  # also a ParallelSizeError and a NotImplementedError
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    assert not parallel_state.model_parallel_is_initialized()
    # Upstream's positional order (tensor, pipeline), the degrees of 1 and the Neuron-only arguments.
    parallel_state.initialize_model_parallel(2, 1, 1, True, 2, context_parallel_size=1)
    outcomes["accepted"] = (parallel_state.get_tensor_model_parallel_size(), parallel_state.get_data_parallel_size())
    parallel_state.destroy_model_parallel()
    return outcomes


def test_upstream_arguments_are_accepted_at_degree_1_and_refused_above(pools):
    for got in pools.get(2).run(_upstream_arguments, timeout=ANSWER_S):
        for name in ("pipeline", "context", "expert"):
            outcome = got[f"{name} 2"]
            assert outcome.startswith("UnsupportedParallelismError") and "is not supported yet" in outcome, outcome
        for key, text in [
            ("pipeline 0", "pipeline_model_parallel_size must be a positive int, got 0"),
            ("tensor True", "tensor_model_parallel_size must be a positive int, got True"),
            ("skip 'yes'", "skip_collective_init must be True or False"),
            ("lnc 0", "lnc_size must be a positive int"),
        ]:
            assert got[key].startswith("ParallelSizeError") and text in got[key], got[key]
        assert got["accepted"] == (2, 1)


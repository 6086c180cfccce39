"""Bad input gets a typed exception whose message says what to do."""

from __future__ import annotations

import pytest
import torch

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import CollectiveError, InputShapeError, LayerConfigError, ParallelSizeError
from neuronx_distributed.parallel_layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    all_reduce_gradients,
    optimizer_step,
)
from neuronx_distributed.parallel_layers.layers import InputChannelParallelConv2d, OutputChannelParallelConv2d


def _layer_sizes_not_divisible():
    with pytest.raises(ParallelSizeError, match=r"ColumnParallelLinear output_size \(6\) is not divisible by 4"):
        ColumnParallelLinear(8, 6)
    with pytest.raises(ParallelSizeError, match=r"RowParallelLinear input_size \(6\)"):
        RowParallelLinear(6, 8)
    with pytest.raises(ParallelSizeError, match=r"num_embeddings \(10\)"):
        ParallelEmbedding(10, 8)
    with pytest.raises(ParallelSizeError, match=r"embedding_dim \(10\)"):
        ParallelEmbedding(8, 10, shard_across_embedding=True)


def _inputs_that_do_not_fit():
    column = ColumnParallelLinear(8, 8, gather_output=False)
    with pytest.raises(InputShapeError, match=r"last dimension is 8, got shape \(2, 3, 5\)"):
        column(torch.randn(2, 3, 5))
    parallel_row = RowParallelLinear(8, 4, input_is_parallel=True)
    with pytest.raises(InputShapeError, match="input_is_parallel=True.*last dimension is 2"):
        parallel_row(torch.randn(3, 8))
    with pytest.raises(InputShapeError, match="last dimension is 8"):
        RowParallelLinear(8, 4)(torch.randn(3, 2))
    embedding = ParallelEmbedding(8, 4)
    with pytest.raises(InputShapeError, match=r"outside \[0, 8\)"):
        embedding(torch.tensor([[1, 8]]))
    with pytest.raises(InputShapeError, match="integer token ids"):
        embedding(torch.ones(2, 2))


def _zero_sizes_and_bool_ids():
    """Checked before any rank-dependent work: every rank raises the same typed error."""
    builds = [
        lambda: ColumnParallelLinear(0, 8),
        lambda: ColumnParallelLinear(8, 0),
        lambda: ColumnParallelLinear(8, 8, stride=0),
        lambda: RowParallelLinear(8, 0),
        lambda: RowParallelLinear(True, 8),
        lambda: ParallelEmbedding(0, 8),
        lambda: ParallelEmbedding(8, 0, shard_across_embedding=True),
        lambda: OutputChannelParallelConv2d(0, 8, 3),
        lambda: InputChannelParallelConv2d(8, 0, 3),
    ]
    for build in builds:
        with pytest.raises(LayerConfigError, match="must be a positive integer"):
            build()
    with pytest.raises(InputShapeError, match="integer token ids, got torch.bool"):
        ParallelEmbedding(8, 4)(torch.tensor([[True, False]]))
    # The seed documented init_method third; upstream (and torch.nn.Embedding) put padding_idx there.
    with pytest.raises(LayerConfigError, match="pass init_method=... by keyword"):
        ParallelEmbedding(8, 4, torch.nn.init.normal_)
    with pytest.raises(LayerConfigError, match="outside the vocabulary"):
        ParallelEmbedding(8, 4, 8)


def _bad_collective_arguments():
    with pytest.raises(CollectiveError, match="use 'sum' or 'max'"):
        comm.all_reduce(torch.ones(2), op="mean")
    with pytest.raises(InputShapeError, match="divisible by the group size 4"):
        comm.reduce_scatter(torch.ones(3, 6), dim=-1)
    with pytest.raises(InputShapeError, match="0-dimensional"):
        comm.all_gather(torch.tensor(1.0))
    with pytest.raises(CollectiveError, match="not one of auto, shm, torch"):
        comm.set_backend("fast")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ParallelSizeError, match="get_data_parallel_group"):
        optimizer_step(optimizer, groups=[[0, 1, 2, 3]])


@pytest.mark.parametrize(
    "case", [_layer_sizes_not_divisible, _inputs_that_do_not_fit, _zero_sizes_and_bool_ids, _bad_collective_arguments]
)
def test_bad_input_raises_typed_errors(pools, case):
    pools.run(4, 4, case)


def _tp_attributes_survive_move():
    from neuronx_distributed.parallel_layers import move_model_to_device

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(ColumnParallelLinear(4, 8, gather_output=False), RowParallelLinear(8, 4, input_is_parallel=True))

    # With this flag `.to()` replaces every Parameter object, as moving to an accelerator does.
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        plain = build().to("cpu")
        assert not hasattr(plain[0].weight, "partition_dim")  # what the seed warns about
        moved = move_model_to_device(build(), "cpu")
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    got = {name: (p.tensor_model_parallel, p.partition_dim, p.partition_stride) for name, p in moved.named_parameters()}
    assert got == {
        "0.weight": (True, 0, 1),
        "0.bias": (True, 0, 1),
        "1.weight": (True, 1, 1),
        "1.bias": (False, 0, 1),
    }
    return parallel_state.get_tensor_model_parallel_rank()


def test_move_model_to_device_keeps_tp_attributes(pools):
    assert pools.run(2, 2, _tp_attributes_survive_move) == [0, 1]


def _gradients_missing_on_some_replicas():
    """Rank 0 has a gradient for `a` only, rank 1 for `b` only (same shapes): each is averaged with zeros."""
    dp_rank = parallel_state.get_data_parallel_rank()
    a, b, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    (a if dp_rank == 0 else b).grad = torch.full((3,), float(dp_rank + 1))
    all_reduce_gradients([a, b, unused])
    torch.testing.assert_close(a.grad, torch.full((3,), 0.5))  # (1 + 0) / 2
    torch.testing.assert_close(b.grad, torch.full((3,), 1.0))  # (0 + 2) / 2
    assert unused.grad is None  # no replica has one: left alone
    return dp_rank


def test_all_reduce_gradients_agrees_on_missing_gradients(pools):
    assert pools.run(2, 1, _gradients_missing_on_some_replicas) == [0, 1]

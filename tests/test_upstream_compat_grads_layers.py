"""Names upstream NxD's own parallel_layers integration tests use: `grads.get_grad_norm`
(plain and over ZeRO-1 shards), `clip_grad_norm` with upstream's positional arguments,
`_initialize_parameter_cpu(param, dim, num_partitions, init_method)`, and the
`BaseParallelLinear` / `BaseParallelConv` bases; each against unsharded torch math.
"""

from __future__ import annotations

import pytest
import torch
from models import MLP
from torch import nn

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import LayerConfigError, ParallelSizeError
from neuronx_distributed.parallel_layers import layers
from neuronx_distributed.parallel_layers.grads import clip_grad_norm, get_grad_norm
from neuronx_distributed.parallel_layers.utils import copy_tensor_model_parallel_attributes

HIDDEN, FFN, BATCH = 8, 16, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _reference_and_sharded_grads(seed: int):
    torch.manual_seed(seed)
    ref = MLP(HIDDEN, FFN, parallel=False)
    torch.manual_seed(seed)
    mlp = MLP(HIDDEN, FFN, parallel=True)
    x = torch.randn(BATCH, HIDDEN, generator=torch.Generator().manual_seed(seed + 1))
    ref(x).pow(2).sum().backward()
    mlp(x).pow(2).sum().backward()
    return ref, mlp


def _zero1_shards(params):
    """This DP rank's slice of each flattened parameter, with its gradient and TP attributes."""
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_size()
    shards = []
    for param in params:
        shard = param.detach().flatten().tensor_split(dp_size)[dp_rank].clone()
        shard.grad = param.grad.flatten().tensor_split(dp_size)[dp_rank].clone()
        copy_tensor_model_parallel_attributes(shard, param)
        shards.append(shard)
    return shards


def _case_get_grad_norm(norm_type):
    ref, mlp = _reference_and_sharded_grads(seed=3)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref.parameters()]), norm_type)
    torch.testing.assert_close(get_grad_norm(mlp.parameters(), norm_type), expected, **TOL)
    dp_lists = parallel_state.get_data_parallel_group(as_list=True)
    shards = _zero1_shards(mlp.parameters())
    torch.testing.assert_close(
        get_grad_norm(shards, norm_type=norm_type, zero1_optimizer=True, zero1_optimizer_groups=dp_lists), expected, **TOL
    )
    torch.testing.assert_close(get_grad_norm(shards, norm_type, True), expected, **TOL)
    return True


@pytest.mark.parametrize("norm_type", [2, float("inf")])
@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_get_grad_norm_matches_unsharded(pools, world_size, tp, norm_type):
    pools.run(world_size, tp, _case_get_grad_norm, norm_type)


def _case_clip_grad_norm_zero1_positional():
    max_norm = 0.1
    ref, mlp = _reference_and_sharded_grads(seed=5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    shards = _zero1_shards(mlp.parameters())
    norm = clip_grad_norm(shards, max_norm, 2, True, parallel_state.get_data_parallel_group(as_list=True))
    torch.testing.assert_close(norm, ref_norm, **TOL)
    clipped = get_grad_norm(shards, 2, True)
    torch.testing.assert_close(clipped, torch.tensor(max_norm), rtol=1e-4, atol=1e-6)
    return True


def test_clip_grad_norm_upstream_positional_zero1(pools):
    pools.run(4, 2, _case_clip_grad_norm_zero1_positional)


def _case_get_grad_norm_bad_groups():
    _, mlp = _reference_and_sharded_grads(seed=1)
    dp_lists = parallel_state.get_data_parallel_group(as_list=True)
    with pytest.raises(ParallelSizeError, match="zero1_optimizer=False"):
        get_grad_norm(mlp.parameters(), 2, False, dp_lists)
    with pytest.raises(ParallelSizeError, match="get_data_parallel_group"):
        get_grad_norm(mlp.parameters(), 2, True, parallel_state.get_tensor_model_parallel_group(as_list=True))
    return True


def test_get_grad_norm_bad_groups_raise_on_every_rank(pools):
    assert pools.run(4, 2, _case_get_grad_norm_bad_groups) == [True] * 4


def _case_initialize_parameter_cpu_num_partitions():
    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()
    for partition_dim, stride in ((0, 1), (1, 1), (0, 2)):
        shape = [6, 4]
        weight = torch.empty(shape)
        torch.manual_seed(7)
        master = layers._initialize_parameter_cpu(weight, partition_dim, size, nn.init.normal_, True, stride=stride)
        full_shape = list(shape)
        full_shape[partition_dim] *= size
        torch.manual_seed(7)
        expected_master = nn.init.normal_(torch.empty(full_shape))
        blocks = expected_master.chunk(size * stride, dim=partition_dim)
        expected = torch.cat(blocks[rank::size], dim=partition_dim)
        assert torch.equal(master, expected_master)
        assert torch.equal(weight, expected)
        assert (weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride) == (True, partition_dim, stride)
    # The earlier 2.x form (a callable third argument) still works, positional return_master_param included.
    weight = torch.empty(5, 3)
    torch.manual_seed(8)
    master = layers._initialize_parameter_cpu(weight, 0, nn.init.normal_, True)
    torch.manual_seed(8)
    assert torch.equal(master, nn.init.normal_(torch.empty(5 * size, 3)))
    with pytest.raises(LayerConfigError, match="num_partitions"):
        layers._initialize_parameter_cpu(torch.empty(5, 3), 0, size + 1, nn.init.normal_)
    with pytest.raises(LayerConfigError, match="init_method"):
        layers._initialize_parameter_cpu(torch.empty(5, 3), 0, size)
    return True


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 2), (4, 4)])
def test_initialize_parameter_cpu_upstream_signatures(pools, world_size, tp):
    pools.run(world_size, tp, _case_initialize_parameter_cpu_num_partitions)


def test_base_classes_list_the_parallel_layers():
    from neuronx_distributed.modules import qkv_linear  # upstream's GQA layer is a BaseParallelLinear too

    assert set(layers.BaseParallelLinear.__subclasses__()) == {
        layers.ColumnParallelLinear,
        layers.RowParallelLinear,
        qkv_linear.GQAQKVColumnParallelLinear,
        qkv_linear.ReplicatedKVColumnParallelLinear,
    }
    assert set(layers.BaseParallelConv.__subclasses__()) == {
        layers.OutputChannelParallelConv2d,
        layers.InputChannelParallelConv2d,
    }

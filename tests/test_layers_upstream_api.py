"""Upstream NxD's layer signatures and helpers: each option against torch.nn with the same seed.

Positional padding_idx, skip_bias_add, the replicated bias of gather_output=True,
keep_master_weight, the group keyword and its alias, collect_output, max_norm, strided
gathering, reduce_output, `_initialize_parameter_cpu`, the conv layers vs torch.nn.Conv2d,
and the helpers of `parallel_layers.utils`.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TOPOLOGIES
from models import expected_shard
from torch import nn

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import LayerConfigError, LayerFeatureNotSupportedError, ParallelSizeError
from neuronx_distributed.parallel_layers import layers, utils
from neuronx_distributed.parallel_layers.layers import (
    ColumnParallelLinear,
    InputChannelParallelConv2d,
    OutputChannelParallelConv2d,
    ParallelEmbedding,
    RowParallelLinear,
)

HIDDEN, FFN, VOCAB = 8, 16, 12
TOL = dict(rtol=1e-5, atol=1e-5)


def _tp():
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


def _assert_shards(model, reference):
    rank, size = _tp()
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, expected_shard(ref_params[name], param, rank, size)), name


def _case_embedding_positional_padding_idx():
    torch.manual_seed(0)
    reference = nn.Embedding(VOCAB, HIDDEN, 0)  # index 0: upstream would drop it
    for shard_across_embedding in (False, True):
        torch.manual_seed(0)
        embedding = ParallelEmbedding(VOCAB, HIDDEN, 0, shard_across_embedding=shard_across_embedding)
        _assert_shards(embedding, reference)
        ids = torch.tensor([[0, 3, 11], [5, 0, 7]])
        torch.testing.assert_close(embedding(ids), reference(ids))
        assert embedding.padding_idx == 0
    return True


def _case_skip_bias_add_and_replicated_bias():
    rank, size = _tp()
    x = torch.randn(3, 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    reference = nn.Linear(HIDDEN, FFN)
    ref_out = reference(x)
    for gather_output in (True, False):
        torch.manual_seed(2)
        column = ColumnParallelLinear(HIDDEN, FFN, gather_output=gather_output, skip_bias_add=True)
        out, bias = column(x)
        assert bias is column.bias
        expected = ref_out if gather_output else ref_out.chunk(size, dim=-1)[rank]
        torch.testing.assert_close(out + bias, expected, **TOL)
        # gather_output=True keeps upstream's full, replicated bias (state dicts of the same shapes).
        expected_bias_shape = (FFN,) if gather_output else (FFN // size,)
        assert column.state_dict()["bias"].shape == expected_bias_shape
        assert column.bias.tensor_model_parallel is (not gather_output)
        torch.testing.assert_close(column.bias, expected_shard(reference.bias, column.bias, rank, size))
    torch.manual_seed(3)
    ref_row = nn.Linear(FFN, HIDDEN)
    torch.manual_seed(3)
    row = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, skip_bias_add=True)
    h = torch.randn(3, FFN, generator=torch.Generator().manual_seed(4))
    out, bias = row(h.chunk(size, dim=-1)[rank])
    torch.testing.assert_close(out + bias, ref_row(h), **TOL)
    return True


def _case_master_weight_and_group_alias():
    rank, size = _tp()
    group = parallel_state.get_tensor_model_parallel_group()
    torch.manual_seed(5)
    reference = nn.Linear(HIDDEN, FFN)
    torch.manual_seed(5)
    column = ColumnParallelLinear(HIDDEN, FFN, keep_master_weight=True, tensor_model_parallel_group=group)
    assert torch.equal(column.master_weight, reference.weight)
    assert "master_weight" not in column.state_dict()
    torch.manual_seed(5)
    row = RowParallelLinear(HIDDEN, FFN, tensor_parallel_group=group)  # our earlier keyword, kept as an alias
    assert row.tensor_parallel_group is group and row.weight.shape == (FFN, HIDDEN // size)
    assert ColumnParallelLinear(HIDDEN, FFN).master_weight is None
    other = parallel_state.get_data_parallel_group()
    if other is not group:
        with pytest.raises(LayerConfigError, match="two different groups"):
            ColumnParallelLinear(HIDDEN, FFN, tensor_model_parallel_group=group, tensor_parallel_group=other)
    return rank


def _case_strided_gather_matches_linear():
    """A fused (stride=3) Column layer that gathers its output returns the unsharded layer's column order."""
    torch.manual_seed(6)
    reference = nn.Linear(HIDDEN, 3 * FFN)
    torch.manual_seed(6)
    column = ColumnParallelLinear(HIDDEN, 3 * FFN, gather_output=True, stride=3)
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(7), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref_out = column(x), reference(x_ref)
    torch.testing.assert_close(out, ref_out, **TOL)
    out.pow(2).sum().backward()
    ref_out.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    rank, size = _tp()
    torch.testing.assert_close(column.weight.grad, expected_shard(reference.weight.grad, column.weight, rank, size), **TOL)
    return True


def _case_row_reduce_output_false():
    rank, size = _tp()
    torch.manual_seed(8)
    reference = nn.Linear(FFN, HIDDEN, bias=False)
    torch.manual_seed(8)
    row = RowParallelLinear(FFN, HIDDEN, bias=False, input_is_parallel=True, reduce_output=False)
    h = torch.randn(3, FFN, generator=torch.Generator().manual_seed(9))
    with comm.record_collectives() as log:
        partial_sum = row(h.chunk(size, dim=-1)[rank])
    assert not log.calls
    torch.testing.assert_close(comm.all_reduce(partial_sum.detach().clone()), reference(h), **TOL)
    with pytest.raises(LayerConfigError, match="skip_bias_add=True"):
        RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, reduce_output=False)
    return True


def _case_embedding_collect_output_and_max_norm():
    rank, size = _tp()
    ids = torch.tensor([[1, 4, 11], [4, 0, 9]])
    torch.manual_seed(10)
    reference = nn.Embedding(VOCAB, HIDDEN)
    torch.manual_seed(10)
    vocab_partial = ParallelEmbedding(VOCAB, HIDDEN, collect_output=False)
    torch.manual_seed(10)
    dim_partial = ParallelEmbedding(VOCAB, HIDDEN, shard_across_embedding=True, collect_output=False)
    with comm.record_collectives() as log:
        vocab_out, dim_out = vocab_partial(ids), dim_partial(ids)
    assert not log.calls
    torch.testing.assert_close(comm.all_reduce(vocab_out.detach().clone()), reference(ids))
    torch.testing.assert_close(dim_out, reference(ids).chunk(size, dim=-1)[rank])

    # max_norm renormalizes only the rows looked up, as torch does (row 0 of each shard untouched).
    torch.manual_seed(11)
    ref_norm = nn.Embedding(VOCAB, HIDDEN, max_norm=0.5)
    torch.manual_seed(11)
    norm = ParallelEmbedding(VOCAB, HIDDEN, max_norm=0.5)
    torch.testing.assert_close(norm(ids), ref_norm(ids), **TOL)
    torch.testing.assert_close(norm.weight.detach(), ref_norm.weight.detach().chunk(size, dim=0)[rank], **TOL)
    if size > 1:
        with pytest.raises(LayerFeatureNotSupportedError, match="max_norm"):
            ParallelEmbedding(VOCAB, HIDDEN, max_norm=1.0, shard_across_embedding=True)
        with pytest.raises(LayerFeatureNotSupportedError, match="scale_grad_by_freq"):
            ParallelEmbedding(VOCAB, HIDDEN, scale_grad_by_freq=True)
    return True


def _case_pad_argument():
    # Sizes the TP size divides need no padding; the others are padded up to its next multiple
    # (upstream's attributes: the padded size and pad_size). tests/test_pad.py checks the numbers.
    _, size = _tp()
    assert ColumnParallelLinear(HIDDEN, FFN, pad=True).output_size_per_partition == FFN // size
    padded = -(-(FFN + 1) // size) * size
    column = ColumnParallelLinear(HIDDEN, FFN + 1, pad=True)
    assert (column.output_size, column.pad_size) == (padded, padded - FFN - 1)
    row = RowParallelLinear(FFN + 1, HIDDEN, pad=True)
    assert (row.input_size, row.input_size_per_partition) == (padded, padded // size)
    assert tuple(ParallelEmbedding(FFN + 1, HIDDEN, pad=True).weight.shape) == (padded // size, HIDDEN)
    if size > 1:
        with pytest.raises(LayerFeatureNotSupportedError, match="pad=True, stride=3"):
            ColumnParallelLinear(HIDDEN, 3 * FFN + 3, stride=3, pad=True)
    return True


def _case_initialize_parameter_cpu():
    rank, size = _tp()
    for partition_dim in (0, 1):
        shape = [5, 7]  # this rank's shard
        weight = torch.empty(shape)
        torch.manual_seed(12)
        master = layers._initialize_parameter_cpu(weight, partition_dim, nn.init.normal_, return_master_param=True)
        torch.manual_seed(12)
        full_shape = list(shape)
        full_shape[partition_dim] *= size
        expected_master = nn.init.normal_(torch.empty(full_shape))
        assert torch.equal(master, expected_master)
        assert torch.equal(weight, expected_master.chunk(size, dim=partition_dim)[rank])
        assert (weight.tensor_model_parallel, weight.partition_dim, weight.num_partitions) == (True, partition_dim, size)
    return True


UPSTREAM_API_CASES = [
    _case_embedding_positional_padding_idx,
    _case_skip_bias_add_and_replicated_bias,
    _case_master_weight_and_group_alias,
    _case_strided_gather_matches_linear,
    _case_row_reduce_output_false,
    _case_embedding_collect_output_and_max_norm,
    _case_pad_argument,
    _case_initialize_parameter_cpu,
]


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 2), (4, 2), (4, 4)])
@pytest.mark.parametrize("case", UPSTREAM_API_CASES, ids=lambda case: case.__name__.removeprefix("_case_"))
def test_upstream_layer_options(pools, world_size, tp, case):
    pools.run(world_size, tp, case)


class BackToBackConvs(nn.Module):
    """Output-channel conv (sharded output) -> ReLU -> input-channel conv, or the torch.nn twin."""

    def __init__(self, parallel: bool):
        super().__init__()
        if parallel:
            self.conv1 = OutputChannelParallelConv2d(4, 8, 3, 1, 1, gather_output=False)
            self.conv2 = InputChannelParallelConv2d(8, 4, (3, 3), 2, (1, 0), dilation=2, input_is_parallel=True)
        else:
            self.conv1 = nn.Conv2d(4, 8, 3, 1, 1)
            self.conv2 = nn.Conv2d(8, 4, (3, 3), 2, (1, 0), dilation=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _conv_cases():
    return {
        "output_channel_gather": (
            lambda: OutputChannelParallelConv2d(4, 8, 3, padding=1, keep_master_weight=True),
            lambda: nn.Conv2d(4, 8, 3, padding=1),
        ),
        "input_channel_scatter": (
            lambda: InputChannelParallelConv2d(8, 4, (3, 2), stride=2, keep_master_weight=True),
            lambda: nn.Conv2d(8, 4, (3, 2), stride=2),
        ),
        "back_to_back": (lambda: BackToBackConvs(parallel=True), lambda: BackToBackConvs(parallel=False)),
    }


def _case_conv(name: str):
    rank, size = _tp()
    build, build_reference = _conv_cases()[name]
    torch.manual_seed(13)
    reference = build_reference()
    torch.manual_seed(13)
    model = build()
    _assert_shards(model, reference)
    if hasattr(model, "master_weight"):
        assert torch.equal(model.master_weight, reference.weight) and torch.equal(model.master_bias, reference.bias)
    in_channels = 8 if name == "input_channel_scatter" else 4
    x = torch.randn(2, in_channels, 9, 9, generator=torch.Generator().manual_seed(14), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref_out = model(x), reference(x_ref)
    torch.testing.assert_close(out, ref_out, **TOL)
    cotangent = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(15))
    (out * cotangent).sum().backward()
    (ref_out * cotangent).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    ref_params = dict(reference.named_parameters())
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(
            param.grad, expected_shard(ref_params[param_name].grad, param, rank, size), **TOL,
            msg=lambda m, param_name=param_name: f"{param_name}: {m}",
        )
    return True


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 2), (4, 4)])
@pytest.mark.parametrize("name", list(_conv_cases()))
def test_conv_layers_match_conv2d(pools, world_size, tp, name):
    pools.run(world_size, tp, _case_conv, name)


def _case_utils():
    rank, size = _tp()
    assert utils.divide(12, 4) == 3
    with pytest.raises(ParallelSizeError, match=r"the size \(7\) is not divisible by 2"):
        utils.divide(7, 2)
    with pytest.raises(ParallelSizeError, match=r"heads \(7\)"):
        utils.divide(7, 2, what="heads")
    chunks = utils.split_tensor_along_last_dim(torch.arange(12.0).reshape(2, 6), 3)
    assert [tuple(c.shape) for c in chunks] == [(2, 2)] * 3 and torch.equal(chunks[1], torch.tensor([[2.0, 3], [8, 9]]))
    with pytest.raises(ParallelSizeError):
        utils.split_tensor_along_last_dim(torch.ones(2, 5), 2)
    assert utils.get_padding_length(10, 4) == 2 and utils.get_padding_length(8, 4) == 0
    assert utils.is_torch_version_greater_than_2()
    assert utils.requires_init_pg_override() is False  # torch 2.x without torch-xla: no pjrt:// override
    # Every rank of the test pool runs on this host.
    assert utils.get_local_world_size() == torch.distributed.get_world_size()
    os.environ["LOCAL_WORLD_SIZE"] = "3"
    try:
        assert utils.get_local_world_size() == 3
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]
    utils.add_barrier("after local world size")

    column = ColumnParallelLinear(HIDDEN, FFN, gather_output=True)
    assert utils.param_is_not_tensor_parallel_duplicate(column.weight)
    assert utils.param_is_not_tensor_parallel_duplicate(column.bias) is (rank == 0)
    tensor = torch.empty(2)
    utils.set_tensor_model_parallel_attributes(tensor=tensor, is_parallel=True, dim=0, stride=1, num_partitions=size)
    assert (tensor.tensor_model_parallel, tensor.partition_dim, tensor.partition_stride, tensor.num_partitions) == (True, 0, 1, size)
    return rank


def test_parallel_layers_utils(pools):
    assert pools.run(4, 2, _case_utils) == [0, 1, 0, 1]


def test_utils_move_model_to_device_keeps_sequence_parallel_marks():
    from neuronx_distributed.parallel_layers.layer_norm import LayerNorm

    # With this flag `.to()` replaces every Parameter object, as moving to an accelerator does.
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        plain = LayerNorm(4, sequence_parallel_enabled=True).to("cpu")
        moved = utils.move_model_to_device(LayerNorm(4, sequence_parallel_enabled=True), "cpu")
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert not hasattr(plain.weight, "sequence_parallel_enabled")
    assert moved.weight.sequence_parallel_enabled and moved.bias.sequence_parallel_enabled


def test_verify_casted_dtype_raises_typed_error_under_autocast():
    from neuronx_distributed.errors import InputShapeError

    nested = {"a": [torch.ones(2, dtype=torch.bfloat16)], "b": (torch.ones(2, dtype=torch.long),)}
    utils.verify_casted_dtype([*nested.values(), torch.ones(2)])  # autocast off: nothing to check
    with torch.autocast("cpu", dtype=torch.bfloat16):
        utils.verify_casted_dtype(nested)
        with pytest.raises(InputShapeError, match="autocast dtype torch.bfloat16, got torch.float32"):
            utils.verify_casted_dtype({"x": [torch.ones(2)]})

"""Sequence parallelism: each SP layer and an SP MLP block against its single-process torch.nn twin.

Activations are `[seq, batch, hidden]`; the batch is split across the DP group and,
outside the Column -> Row region, the sequence across the TP group. Forward output,
input gradient and every parameter gradient (after allreduce_sequence_parallel_gradients
and the DP all-reduce) must equal the unsharded model's for every topology; the
collectives each layer issues forward and backward are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
from conftest import TOPOLOGIES
from models import SequenceParallelMLP, expected_shard, same_seed_twins
from torch import nn

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import InputShapeError, LayerConfigError
from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, all_reduce_gradients
from neuronx_distributed.parallel_layers import mappings
from neuronx_distributed.parallel_layers.grads import allreduce_sequence_parallel_gradients

HIDDEN, FFN, VOCAB, BATCH, SEQ = 16, 32, 24, 4, 8
TOL = dict(rtol=1e-5, atol=1e-5)
SEQ_CHUNK, FEATURE_SHARD, FULL = "seq_chunk", "feature_shard", "full"


@dataclass
class SPCase:
    build: object
    input_layout: str  # how this rank's input derives from the full one (after the DP split of the batch)
    output_layout: str
    in_features: int = HIDDEN
    token_ids: bool = False
    forward_collectives: dict = field(default_factory=dict)
    backward_collectives: dict = field(default_factory=dict)


def _column(parallel):
    return ColumnParallelLinear(HIDDEN, FFN, gather_output=False, sequence_parallel_enabled=True) if parallel else nn.Linear(HIDDEN, FFN)


def _row(parallel):
    if parallel:
        return RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, sequence_parallel_enabled=True)
    return nn.Linear(FFN, HIDDEN)


def _embedding(parallel, shard_across_embedding):
    if parallel:
        return ParallelEmbedding(
            VOCAB, HIDDEN, 1, shard_across_embedding=shard_across_embedding, sequence_parallel_enabled=True
        )
    return nn.Embedding(VOCAB, HIDDEN, 1)


CASES = {
    "column": SPCase(_column, SEQ_CHUNK, FEATURE_SHARD, forward_collectives={"all_gather": 1}, backward_collectives={"reduce_scatter": 1}),
    "row": SPCase(
        _row, FEATURE_SHARD, SEQ_CHUNK, in_features=FFN, forward_collectives={"reduce_scatter": 1}, backward_collectives={"all_gather": 1}
    ),
    "embedding_vocab": SPCase(
        partial(_embedding, shard_across_embedding=False), FULL, SEQ_CHUNK, token_ids=True,
        forward_collectives={"reduce_scatter": 1}, backward_collectives={"all_gather": 1},
    ),
    "embedding_dim": SPCase(
        partial(_embedding, shard_across_embedding=True), FULL, SEQ_CHUNK, token_ids=True,
        forward_collectives={"all_gather": 1}, backward_collectives={"all_gather": 1},
    ),
    # The Megatron SP block: one all-gather and one reduce-scatter each way, no all-reduce.
    "mlp_block": SPCase(
        partial(SequenceParallelMLP, HIDDEN, FFN), SEQ_CHUNK, SEQ_CHUNK,
        forward_collectives={"all_gather": 1, "reduce_scatter": 1},
        backward_collectives={"all_gather": 1, "reduce_scatter": 1},
    ),
}


def _local(tensor, layout, tp_rank, tp_size):
    if layout == SEQ_CHUNK:
        return tensor.chunk(tp_size, dim=0)[tp_rank]
    if layout == FEATURE_SHARD:
        return tensor.chunk(tp_size, dim=-1)[tp_rank]
    return tensor


def _case_sp_step(case_name: str, seed: int = 99):
    case = CASES[case_name]
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()

    reference, model = same_seed_twins(case.build, seed)
    ref_params, params = dict(reference.named_parameters()), dict(model.named_parameters())

    generator = torch.Generator().manual_seed(seed + 1)
    if case.token_ids:
        inputs = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
        inputs[0, 0] = 1  # the padding index takes part
    else:
        inputs = torch.randn(SEQ, BATCH, case.in_features, generator=generator, requires_grad=True)
    ref_out = reference(inputs)
    cotangent = torch.randn(ref_out.shape, generator=generator)
    (ref_out * cotangent).sum().div(BATCH).backward()

    local_batch = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    local_inputs = _local(inputs.detach()[:, local_batch], case.input_layout, tp_rank, tp_size)
    if not case.token_ids:
        local_inputs = local_inputs.clone().requires_grad_(True)
    local_cotangent = _local(cotangent[:, local_batch], case.output_layout, tp_rank, tp_size)
    expected_out = _local(ref_out.detach()[:, local_batch], case.output_layout, tp_rank, tp_size)

    with comm.record_collectives() as forward_log:
        out = model(local_inputs)
    torch.testing.assert_close(out, expected_out, **TOL)
    with comm.record_collectives() as backward_log:
        (out * local_cotangent).sum().div(BATCH // dp_size).backward()
    assert forward_log.counts() == Counter(case.forward_collectives if tp_size > 1 else {})
    assert backward_log.counts() == Counter(case.backward_collectives if tp_size > 1 else {})

    if not case.token_ids:
        expected_grad = _local(inputs.grad[:, local_batch] * dp_size, case.input_layout, tp_rank, tp_size)
        torch.testing.assert_close(local_inputs.grad, expected_grad, **TOL)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    marked = [name for name, p in params.items() if getattr(p, "sequence_parallel_enabled", False)]
    with comm.record_collectives() as sp_log:
        allreduce_sequence_parallel_gradients(optimizer)
    # One presence mask and one bucket for all the marked gradients.
    assert sp_log.counts() == Counter({"all_reduce": 2} if marked and tp_size > 1 else {})
    all_reduce_gradients(model.parameters(), group=parallel_state.get_data_parallel_group())
    for name, param in params.items():
        torch.testing.assert_close(
            param.grad, expected_shard(ref_params[name].grad, param, tp_rank, tp_size), **TOL,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    return sorted(marked)


@pytest.mark.parametrize("world_size,tp", TOPOLOGIES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_sequence_parallel_matches_unsharded(pools, world_size, tp, case_name):
    marked = pools.run(world_size, tp, _case_sp_step, case_name)
    expected = {"row": ["bias"], "mlp_block": ["fc2.bias", "norm.bias", "norm.weight"]}.get(case_name, [])
    assert marked == [expected] * world_size


def _case_mappings(dim: int):
    """Every sequence-parallel mapping, forward and backward, on rank-dependent values."""
    group = parallel_state.get_tensor_model_parallel_group()
    size, rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    shape = [4, 4, 3]
    shape[dim] = 2 * size
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    per_rank = [full * (r + 1) for r in range(size)]  # what rank r contributes

    def chunk(tensor, r):
        return tensor.chunk(size, dim=dim)[r]

    x = full.clone().requires_grad_(True)
    out = mappings.scatter_to_sequence_parallel_region(x, sequence_dimension=dim)
    torch.testing.assert_close(out, chunk(full, rank))
    out.backward(chunk(per_rank[rank], rank))
    torch.testing.assert_close(x.grad, torch.cat([chunk(per_rank[r], r) for r in range(size)], dim=dim))

    for to_model_parallel in (True, False):
        x = chunk(full, rank).clone().requires_grad_(True)
        out = mappings.gather_from_sequence_parallel_region(x, to_model_parallel, dim, group)
        torch.testing.assert_close(out, full)
        out.backward(per_rank[rank])
        expected = chunk(sum(per_rank), rank) if to_model_parallel else chunk(per_rank[rank], rank)
        torch.testing.assert_close(x.grad, expected)

    x = per_rank[rank].clone().requires_grad_(True)
    out = mappings.reduce_scatter_to_sequence_parallel_region(x, sequence_dimension=dim)
    torch.testing.assert_close(out, chunk(sum(per_rank), rank))
    out.backward(chunk(per_rank[rank], rank))
    torch.testing.assert_close(x.grad, torch.cat([chunk(per_rank[r], r) for r in range(size)], dim=dim))

    x = chunk(full, rank).clone().requires_grad_(True)
    out = mappings.gather_from_tensor_model_parallel_region_with_dim(x, dim)
    torch.testing.assert_close(out, full)
    out.backward(per_rank[rank])
    torch.testing.assert_close(x.grad, chunk(per_rank[rank], rank))

    x = per_rank[rank].clone().requires_grad_(True)
    out = mappings.reduce_scatter_to_tensor_model_parallel_region_with_dim(x, dim)
    torch.testing.assert_close(out, chunk(sum(per_rank), rank))
    return rank


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("world_size,tp", [(2, 2), (4, 4), (4, 2)])
def test_sequence_parallel_mappings(pools, world_size, tp, dim):
    assert pools.run(world_size, tp, _case_mappings, dim) == [r % tp for r in range(world_size)]


def _case_mappings_take_process_group():
    """The four TP mappings and the SP ones honour process_group: here the DP group, not the default TP one."""
    dp_group = parallel_state.get_data_parallel_group()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_size()
    full = torch.arange(8.0).reshape(2, 4)
    rank_value = torch.full((2, 2), float(dp_rank + 1))
    torch.testing.assert_close(
        mappings.scatter_to_tensor_model_parallel_region(full, dp_group), full.chunk(dp_size, dim=-1)[dp_rank]
    )
    torch.testing.assert_close(
        mappings.gather_from_tensor_model_parallel_region(full.chunk(dp_size, dim=-1)[dp_rank], process_group=dp_group), full
    )
    expected_sum = torch.full((2, 2), float(sum(range(1, dp_size + 1))))
    torch.testing.assert_close(mappings.reduce_from_tensor_model_parallel_region(rank_value.clone(), dp_group), expected_sum)
    x = rank_value.clone().requires_grad_(True)
    mappings.copy_to_tensor_model_parallel_region(x, process_group=dp_group).backward(rank_value)
    torch.testing.assert_close(x.grad, expected_sum)
    torch.testing.assert_close(
        mappings.scatter_to_sequence_parallel_region(full.T.contiguous(), 0, dp_group), full.T.chunk(dp_size, dim=0)[dp_rank]
    )
    return dp_rank


def test_mappings_take_process_group(pools):
    # TP=2 on 4 ranks: the DP groups are [0, 2] and [1, 3].
    assert pools.run(4, 2, _case_mappings_take_process_group) == [0, 0, 1, 1]


def _case_sequence_parallel_bad_input():
    with pytest.raises(LayerConfigError, match="needs input_is_parallel=True"):
        RowParallelLinear(8, 8, sequence_parallel_enabled=True)
    with pytest.raises(LayerConfigError, match="needs gather_output=False"):
        ColumnParallelLinear(8, 8, sequence_parallel_enabled=True)
    with pytest.raises(LayerConfigError, match="collect_output"):
        ParallelEmbedding(8, 8, sequence_parallel_enabled=True, collect_output=False)
    row = RowParallelLinear(8, 8, input_is_parallel=True, sequence_parallel_enabled=True)
    with pytest.raises(InputShapeError, match=r"sequence length .* is 6, which the tensor parallel size 4 does not divide"):
        row(torch.randn(6, 2, 2))
    with pytest.raises(InputShapeError, match="sequence length"):
        mappings.scatter_to_sequence_parallel_region(torch.randn(2, 5, 3), sequence_dimension=1)
    embedding = ParallelEmbedding(8, 8, sequence_parallel_enabled=True)
    with pytest.raises(InputShapeError, match="sequence length"):
        embedding(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InputShapeError, match="size to split"):
        mappings.scatter_to_tensor_model_parallel_region(torch.randn(2, 6))
    return parallel_state.get_tensor_model_parallel_rank()


def test_sequence_parallel_bad_input_raises_on_every_rank(pools):
    assert pools.run(4, 4, _case_sequence_parallel_bad_input) == [0, 1, 2, 3]

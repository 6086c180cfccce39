"""Every TP layer and block against its single-process torch.nn twin.

Forward output, input gradient, every parameter gradient (after the DP
all-reduce), the clipped norm and the parameters after one optimizer step must
equal the unsharded model's, for every (world size, TP size) topology; the
number of collectives each layer issues forward and backward is asserted too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
from conftest import TOPOLOGIES
from models import MLP, SelfAttention, expected_shard, same_seed_twins
from torch import nn

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.parallel_layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    all_reduce_gradients,
    clip_grad_norm,
)

HIDDEN, FFN, HEADS, VOCAB, BATCH, SEQ = 16, 32, 4, 24, 4, 3
TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass
class LayerCase:
    """A layer built as reference (parallel=False) and TP (parallel=True) with the same seed."""

    build: object
    input_sharded: bool = False  # the TP layer takes this rank's slice of the features
    output_sharded: bool = False  # the TP layer returns this rank's slice of the features
    token_ids: bool = False
    forward_collectives: dict = field(default_factory=dict)
    backward_collectives: dict = field(default_factory=dict)


def _column(parallel, gather_output):
    if parallel:
        return ColumnParallelLinear(HIDDEN, FFN, gather_output=gather_output)
    return nn.Linear(HIDDEN, FFN)


def _row(parallel, input_is_parallel):
    if parallel:
        return RowParallelLinear(FFN, HIDDEN, input_is_parallel=input_is_parallel)
    return nn.Linear(FFN, HIDDEN)


def _embedding(parallel, shard_across_embedding):
    if parallel:
        return ParallelEmbedding(VOCAB, HIDDEN, padding_idx=1, shard_across_embedding=shard_across_embedding)
    return nn.Embedding(VOCAB, HIDDEN, padding_idx=1)


CASES = {
    "column_gather": LayerCase(
        partial(_column, gather_output=True), forward_collectives={"all_gather": 1}, backward_collectives={"all_reduce": 1}
    ),
    "column_sharded_out": LayerCase(
        partial(_column, gather_output=False), output_sharded=True, backward_collectives={"all_reduce": 1}
    ),
    "row_full_input": LayerCase(
        partial(_row, input_is_parallel=False), forward_collectives={"all_reduce": 1}, backward_collectives={"all_gather": 1}
    ),
    "row_parallel_input": LayerCase(
        partial(_row, input_is_parallel=True), input_sharded=True, forward_collectives={"all_reduce": 1}
    ),
    "embedding_vocab": LayerCase(
        partial(_embedding, shard_across_embedding=False), token_ids=True, forward_collectives={"all_reduce": 1}
    ),
    "embedding_dim": LayerCase(
        partial(_embedding, shard_across_embedding=True), token_ids=True, forward_collectives={"all_gather": 1}
    ),
    # The Megatron minimum: one all-reduce forward and one backward per block.
    "mlp": LayerCase(
        partial(MLP, HIDDEN, FFN), forward_collectives={"all_reduce": 1}, backward_collectives={"all_reduce": 1}
    ),
    "attention_fused_qkv": LayerCase(
        partial(SelfAttention, HIDDEN, HEADS, fused_qkv=True),
        forward_collectives={"all_reduce": 1},
        backward_collectives={"all_reduce": 1},
    ),
    # The seed's BERT swap: three Column layers, each all-reduces its input gradient.
    "attention_seed": LayerCase(
        partial(SelfAttention, HIDDEN, HEADS), forward_collectives={"all_reduce": 1}, backward_collectives={"all_reduce": 3}
    ),
}


def _optimizer(parameters):
    # SGD is linear in the gradients, so ~1e-5 agreement of the grads carries over to the step.
    # (AdamW's normalized step turns noise-level grads, such as the key bias's, into full-size steps.)
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=0.01)


def _features_shard(tensor, tp_rank, tp_size):
    return tensor.chunk(tp_size, dim=-1)[tp_rank]


def _case_train_step(case_name: str, max_norm: float, seed: int = 1234):
    case = CASES[case_name]
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()

    reference, model = same_seed_twins(case.build, seed)
    ref_params, params = dict(reference.named_parameters()), dict(model.named_parameters())

    generator = torch.Generator().manual_seed(seed + 1)
    if case.token_ids:
        inputs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        inputs[0, 0] = 1  # the padding index takes part
    else:
        in_features = FFN if case_name.startswith("row") else HIDDEN
        inputs = torch.randn(BATCH, SEQ, in_features, generator=generator, requires_grad=True)
    ref_out = reference(inputs)
    cotangent = torch.randn(ref_out.shape, generator=generator)
    (ref_out * cotangent).sum().div(BATCH).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert ref_norm > max_norm, "the case must exercise clipping"
    _optimizer(reference.parameters()).step()

    # This rank's data: its DP slice of the batch, its TP slice of sharded features.
    local_batch = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    local_inputs = inputs.detach()[local_batch]
    if case.input_sharded:
        local_inputs = _features_shard(local_inputs, tp_rank, tp_size)
    if not case.token_ids:
        local_inputs = local_inputs.clone().requires_grad_(True)
    local_cotangent = cotangent[local_batch]
    expected_out = ref_out.detach()[local_batch]
    if case.output_sharded:
        local_cotangent = _features_shard(local_cotangent, tp_rank, tp_size)
        expected_out = _features_shard(expected_out, tp_rank, tp_size)

    with comm.record_collectives() as forward_log:
        out = model(local_inputs)
    torch.testing.assert_close(out, expected_out, **TOL)
    with comm.record_collectives() as backward_log:
        (out * local_cotangent).sum().div(BATCH // dp_size).backward()
    expected_forward = Counter(case.forward_collectives if tp_size > 1 else {})
    expected_backward = Counter(case.backward_collectives if tp_size > 1 else {})
    assert forward_log.counts() == expected_forward
    assert backward_log.counts() == expected_backward

    if not case.token_ids:
        # The local loss is a mean over the local batch: dp_size times the reference's share.
        expected_grad = inputs.grad[local_batch] * dp_size
        if case.input_sharded:
            expected_grad = _features_shard(expected_grad, tp_rank, tp_size)
        torch.testing.assert_close(local_inputs.grad, expected_grad, **TOL)

    all_reduce_gradients(model.parameters(), group=parallel_state.get_data_parallel_group())
    norm = clip_grad_norm(model.parameters(), max_norm)
    torch.testing.assert_close(norm, ref_norm, **TOL)
    for name, param in params.items():
        torch.testing.assert_close(
            param.grad, expected_shard(ref_params[name].grad, param, tp_rank, tp_size), **TOL, msg=lambda m, name=name: f"{name}: {m}"
        )
    _optimizer(model.parameters()).step()
    for name, param in params.items():
        torch.testing.assert_close(
            param.detach(), expected_shard(ref_params[name].detach(), param, tp_rank, tp_size), **TOL, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("world_size,tp", TOPOLOGIES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_unsharded_model(pools, world_size, tp, case_name):
    pools.run(world_size, tp, _case_train_step, case_name, max_norm=0.05)


def _case_leading_dims(shape):
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(0)
    ref = MLP(HIDDEN, FFN, parallel=False)
    torch.manual_seed(0)
    mlp = MLP(HIDDEN, FFN, parallel=True)
    torch.manual_seed(0)
    ref_column = nn.Linear(HIDDEN, FFN)
    torch.manual_seed(0)
    column = ColumnParallelLinear(HIDDEN, FFN, gather_output=True)
    x = torch.randn(*shape, HIDDEN, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(mlp(x), ref(x), **TOL)
    torch.testing.assert_close(column(x), ref_column(x), **TOL)
    row = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True)
    assert row(torch.randn(*shape, FFN // tp_size)).shape == (*shape, HIDDEN)
    return tp_rank


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 2, 3)], ids=["2d", "3d", "4d"])
def test_any_number_of_leading_dims(pools, shape):
    assert pools.run(2, 2, _case_leading_dims, shape) == [0, 1]


def _case_clip_norm_types(norm_type, max_norm):
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(3)
    ref = MLP(HIDDEN, FFN, parallel=False)
    torch.manual_seed(3)
    mlp = MLP(HIDDEN, FFN, parallel=True)
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(4))
    ref(x).pow(2).sum().backward()
    mlp(x).pow(2).sum().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type=norm_type)
    norm = clip_grad_norm(mlp.parameters(), max_norm, norm_type=norm_type)
    torch.testing.assert_close(norm, ref_norm, **TOL)
    ref_params = dict(ref.named_parameters())
    for name, param in mlp.named_parameters():
        torch.testing.assert_close(param.grad, expected_shard(ref_params[name].grad, param, tp_rank, tp_size), **TOL)


@pytest.mark.parametrize("max_norm", [0.1, 1e6], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("norm_type", [1, 2, 3.5, float("inf")])
def test_clip_grad_norm_types(pools, norm_type, max_norm):
    pools.run(4, 4, _case_clip_norm_types, norm_type, max_norm)


def _case_torch_sees_the_same_collectives(case_name):
    """PyTorch's own CommDebugMode, on the torch engine, counts what our log counts."""
    from torch.distributed.tensor.debug import CommDebugMode

    case = CASES[case_name]
    comm.set_backend("torch")
    try:
        torch.manual_seed(0)
        model = case.build(parallel=True)
        x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
        with CommDebugMode() as forward_mode:
            out = model(x)
        with CommDebugMode() as backward_mode:
            out.sum().backward()
    finally:
        comm.set_backend("auto")
    names = {"c10d.allreduce_": "all_reduce", "c10d._allgather_base_": "all_gather"}
    # On gloo the torch engine's all_gather is one broadcast from each rank of the group (faster than
    # gloo's own all-gather): that many broadcasts are one all_gather.
    group_size = parallel_state.get_tensor_model_parallel_size()

    def counts(mode):
        counted = Counter()
        for op, n in mode.get_comm_counts().items():
            if str(op) == "c10d.broadcast_":
                assert n % group_size == 0, f"{n} broadcasts are not whole all-gathers over {group_size} ranks"
                counted["all_gather"] += n // group_size
            else:
                counted[names.get(str(op), str(op))] += n
        return +counted

    assert counts(forward_mode) == Counter(case.forward_collectives)
    assert counts(backward_mode) == Counter(case.backward_collectives)


@pytest.mark.parametrize("case_name", ["mlp", "attention_fused_qkv", "attention_seed", "column_gather"])
def test_torch_comm_debug_mode_agrees(pools, case_name):
    pools.run(2, 2, _case_torch_sees_the_same_collectives, case_name)

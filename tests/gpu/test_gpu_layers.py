"""Each TP layer, the MLP and the attention blocks on the test device against torch.nn on that device.

Both models are built on CPU from one seed (each shard an exact slice of the
reference) and moved with `move_model_to_device`; then forward, input gradient,
parameter gradients after the DP all-reduce, `clip_grad_norm` and one optimizer
step must match the reference's, with the collectives counted, at every
topology of the suite. Layers built with `device=` hold their shards there, and
forward + backward at TP=1 read nothing back from the GPU.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from models import expected_shard, same_seed_twins
from test_layers import BATCH, CASES, FFN, HIDDEN, SEQ, TOL, VOCAB, _features_shard, _optimizer

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.parallel_layers.random import model_parallel_xla_manual_seed
from neuronx_distributed.parallel_layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    all_reduce_gradients,
    clip_grad_norm,
    move_model_to_device,
)

from .conftest import TOPOLOGIES, TOPOLOGY_IDS

MAX_NORM = 0.05


def _case_train_step(case_name: str, device: str, seed: int = 1234):
    case = CASES[case_name]
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    reference, model = same_seed_twins(case.build, seed)
    reference.to(device)
    move_model_to_device(model, device)
    ref_params, params = dict(reference.named_parameters()), dict(model.named_parameters())
    assert all(p.device.type == device for p in params.values())

    generator = torch.Generator().manual_seed(seed + 1)
    if case.token_ids:
        inputs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        inputs[0, 0] = 1  # the padding index takes part
    else:
        inputs = torch.randn(BATCH, SEQ, FFN if case_name.startswith("row") else HIDDEN, generator=generator)
    inputs = inputs.to(device).requires_grad_(not case.token_ids)
    ref_out = reference(inputs)
    cotangent = torch.randn(ref_out.shape, generator=generator).to(device)
    (ref_out * cotangent).sum().div(BATCH).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
    _optimizer(reference.parameters()).step()

    local_batch = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    local_inputs = inputs.detach()[local_batch]
    if case.input_sharded:
        local_inputs = _features_shard(local_inputs, tp_rank, tp_size)
    local_inputs = local_inputs.clone().requires_grad_(not case.token_ids)
    local_cotangent, expected_out = cotangent[local_batch], ref_out.detach()[local_batch]
    if case.output_sharded:
        local_cotangent = _features_shard(local_cotangent, tp_rank, tp_size)
        expected_out = _features_shard(expected_out, tp_rank, tp_size)

    with comm.record_collectives() as forward_log:
        out = model(local_inputs)
    assert out.device.type == device
    torch.testing.assert_close(out, expected_out, **TOL)
    with comm.record_collectives() as backward_log:
        (out * local_cotangent).sum().div(BATCH // dp_size).backward()
    assert forward_log.counts() == Counter(case.forward_collectives if tp_size > 1 else {})
    assert backward_log.counts() == Counter(case.backward_collectives if tp_size > 1 else {})
    if not case.token_ids:
        expected_grad = inputs.grad[local_batch] * dp_size
        if case.input_sharded:
            expected_grad = _features_shard(expected_grad, tp_rank, tp_size)
        torch.testing.assert_close(local_inputs.grad, expected_grad, **TOL)

    all_reduce_gradients(model.parameters(), group=parallel_state.get_data_parallel_group())
    norm = clip_grad_norm(model.parameters(), MAX_NORM)
    torch.testing.assert_close(torch.as_tensor(norm, device=device), ref_norm, **TOL)
    _optimizer(model.parameters()).step()
    for name, param in params.items():
        assert param.grad.device.type == device, name
        expected = expected_shard(ref_params[name].detach(), param, tp_rank, tp_size)
        torch.testing.assert_close(param.detach(), expected, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_torch_nn_on_the_device(device_pools, device, backend, world_size, tp, case_name):
    device_pools.run(backend, world_size, tp, _case_train_step, case_name, device)


def _case_built_on_the_device(device: str):
    """`device=` puts each shard on the device; the layers compute the unsharded math there."""
    tp_size = parallel_state.get_tensor_model_parallel_size()
    # Off CPU the layers draw only their shard, from the per-rank stream; this also seeds the default
    # generators, so the replicated biases are alike on every rank.
    model_parallel_xla_manual_seed(7)
    column = ColumnParallelLinear(HIDDEN, FFN, gather_output=False, device=device)
    row = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, device=device)
    embedding = ParallelEmbedding(VOCAB, HIDDEN, device=device)
    for layer in (column, row, embedding):
        for name, param in layer.named_parameters():
            assert param.device.type == device, (type(layer).__name__, name)
    assert column.weight.shape == (FFN // tp_size, HIDDEN) and row.weight.shape == (HIDDEN, FFN // tp_size)
    x = torch.randn(BATCH, HIDDEN, generator=torch.Generator().manual_seed(3)).to(device)
    ids = torch.arange(BATCH, device=device) * 5 % VOCAB
    full = {name: comm.all_gather(p.detach(), dim=p.partition_dim) for name, p in
            [("column", column.weight), ("column_bias", column.bias), ("row", row.weight), ("embedding", embedding.weight)]}
    hidden = F.linear(x, full["column"], full["column_bias"])
    expected = F.linear(hidden, full["row"], row.bias.detach())
    rank, shard = parallel_state.get_tensor_model_parallel_rank(), FFN // tp_size
    out = row(column(x))
    torch.testing.assert_close(column(x), hidden[:, rank * shard:(rank + 1) * shard], **TOL)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(embedding(ids), F.embedding(ids, full["embedding"]), **TOL)


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_layers_built_on_the_device(device_pools, device, backend, world_size, tp):
    device_pools.run(backend, world_size, tp, _case_built_on_the_device, device)


def _case_no_host_sync(device: str):
    """Forward and backward of every case at TP=1 with CUDA's sync debug mode raising on any host sync."""
    for case_name, case in CASES.items():
        torch.manual_seed(0)
        model = move_model_to_device(case.build(parallel=True), device)
        if case.token_ids:
            inputs = torch.randint(0, VOCAB, (BATCH, SEQ)).to(device)
        else:
            inputs = torch.randn(BATCH, SEQ, FFN if case_name.startswith("row") else HIDDEN).to(device).requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(inputs).sum().backward()
        except RuntimeError as error:
            raise AssertionError(f"{case_name}: a host sync on the per-step path: {error}") from error
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_forward_backward_without_host_sync(device_pools, device):
    if device != "cuda":
        pytest.skip("the host-sync check needs CUDA's sync debug mode")
    device_pools.run("gloo", 1, 1, _case_no_host_sync, device)

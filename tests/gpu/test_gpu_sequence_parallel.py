"""Sequence parallelism and parallel_cross_entropy on the test device against torch on that device.

The SP layers and block (activations `[seq, batch, hidden]`) must give the
reference's outputs, input gradients and parameter gradients; the vocabulary-
parallel cross entropy the loss and logits gradient of F.cross_entropy on the
gathered logits. Out-of-range targets raise on CPU and give NaN on an
accelerator, where cross entropy reads nothing back from the device.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from models import expected_shard, same_seed_twins
from test_loss_functions import VOCAB as LOSS_VOCAB
from test_loss_functions import _problem, _shard
from test_sequence_parallel import BATCH, CASES, SEQ, TOL, VOCAB, _local

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import LossInputError
from neuronx_distributed.parallel_layers import all_reduce_gradients, move_model_to_device
from neuronx_distributed.parallel_layers.grads import allreduce_sequence_parallel_gradients
from neuronx_distributed.parallel_layers.loss_functions import _VocabParallelCrossEntropy, parallel_cross_entropy

from .conftest import TOPOLOGIES, TOPOLOGY_IDS


def _case_sp_step(case_name: str, device: str, seed: int = 99):
    case = CASES[case_name]
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    reference, model = same_seed_twins(case.build, seed)
    reference.to(device)
    move_model_to_device(model, device)
    ref_params, params = dict(reference.named_parameters()), dict(model.named_parameters())

    generator = torch.Generator().manual_seed(seed + 1)
    if case.token_ids:
        inputs = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
        inputs[0, 0] = 1  # the padding index takes part
    else:
        inputs = torch.randn(SEQ, BATCH, case.in_features, generator=generator)
    inputs = inputs.to(device).requires_grad_(not case.token_ids)
    ref_out = reference(inputs)
    cotangent = torch.randn(ref_out.shape, generator=generator).to(device)
    (ref_out * cotangent).sum().div(BATCH).backward()

    local_batch = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    local_inputs = _local(inputs.detach()[:, local_batch], case.input_layout, tp_rank, tp_size)
    local_inputs = local_inputs.clone().requires_grad_(not case.token_ids)
    local_cotangent = _local(cotangent[:, local_batch], case.output_layout, tp_rank, tp_size)
    with comm.record_collectives() as forward_log:
        out = model(local_inputs)
    assert out.device.type == device
    torch.testing.assert_close(out, _local(ref_out.detach()[:, local_batch], case.output_layout, tp_rank, tp_size), **TOL)
    with comm.record_collectives() as backward_log:
        (out * local_cotangent).sum().div(BATCH // dp_size).backward()
    assert forward_log.counts() == Counter(case.forward_collectives if tp_size > 1 else {})
    assert backward_log.counts() == Counter(case.backward_collectives if tp_size > 1 else {})
    if not case.token_ids:
        expected_grad = _local(inputs.grad[:, local_batch] * dp_size, case.input_layout, tp_rank, tp_size)
        torch.testing.assert_close(local_inputs.grad, expected_grad, **TOL)

    allreduce_sequence_parallel_gradients(torch.optim.SGD(model.parameters(), lr=0.1))
    all_reduce_gradients(model.parameters(), group=parallel_state.get_data_parallel_group())
    for name, param in params.items():
        expected = expected_shard(ref_params[name].grad, param, tp_rank, tp_size)
        torch.testing.assert_close(param.grad, expected, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_sequence_parallel_matches_torch_on_the_device(device_pools, device, backend, world_size, tp, case_name):
    device_pools.run(backend, world_size, tp, _case_sp_step, case_name, device)


def _case_cross_entropy(device: str, label_smoothing: float):
    group = parallel_state.get_tensor_model_parallel_group()
    logits, target, grad_output = (t.to(device) for t in _problem(seed=100 + parallel_state.get_data_parallel_rank()))
    shard = _shard(logits, group).clone().requires_grad_()
    loss = parallel_cross_entropy(shard, target, label_smoothing)
    loss.backward(grad_output)
    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(full.view(-1, LOSS_VOCAB), target.view(-1), reduction="none",
                               label_smoothing=label_smoothing).view(target.shape)
    expected.backward(grad_output)
    assert loss.device.type == device
    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(shard.grad, _shard(full.grad, group), **TOL)

    bf16_loss = parallel_cross_entropy(shard.detach().bfloat16(), target, label_smoothing)
    assert bf16_loss.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_loss.float(), expected.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch_on_the_device(device_pools, device, backend, world_size, tp, label_smoothing):
    device_pools.run(backend, world_size, tp, _case_cross_entropy, device, label_smoothing)


def _nan_exactly_at(bad: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> None:
    assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[~bad]).any()
    assert torch.isnan(grad[bad]).all() and not torch.isnan(grad[~bad]).any()


def _case_out_of_range_target(device: str):
    group = parallel_state.get_tensor_model_parallel_group()
    logits, target, _ = (t.to(device) for t in _problem(seed=5))
    target[1, 2] = LOSS_VOCAB  # one past the vocabulary
    bad = torch.zeros_like(target, dtype=torch.bool)
    bad[1, 2] = True
    shard = _shard(logits, group).clone().requires_grad_()
    # The loss itself, without the argument checks: NaN at the bad token, on any device.
    loss = _VocabParallelCrossEntropy.apply(shard, target, 0.0, -100, group)
    loss.sum().backward()
    _nan_exactly_at(bad, loss.detach(), shard.grad)
    if device == "cpu":
        with pytest.raises(LossInputError, match="outside the vocabulary"):
            parallel_cross_entropy(shard, target)
        return
    shard.grad = None
    sync_checked = device == "cuda" and parallel_state.get_tensor_model_parallel_size() == 1
    if sync_checked:  # gloo's CUDA collectives synchronize streams themselves: checked without collectives
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        loss = parallel_cross_entropy(shard, target)
        loss.sum().backward()
    finally:
        if sync_checked:
            torch.cuda.set_sync_debug_mode("default")
    _nan_exactly_at(bad, loss.detach(), shard.grad)


@pytest.mark.parametrize("backend,world_size,tp", TOPOLOGIES, ids=TOPOLOGY_IDS)
def test_out_of_range_target_raises_on_cpu_and_is_nan_on_an_accelerator(device_pools, device, backend, world_size, tp):
    device_pools.run(backend, world_size, tp, _case_out_of_range_target, device)

"""parallel_cross_entropy against F.cross_entropy on the gathered logits, on real process groups.

Loss and logits gradient must match the unsharded loss for every topology, with
and without label smoothing and ignored positions; the collectives are counted
to show that only a few numbers per token cross the group (two all-reduces
forward, none backward, never an all-gather); bad input raises the same typed
error on every rank before any collective.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import TOPOLOGIES

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import InputShapeError, LossInputError
from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy

BATCH, SEQ, VOCAB = 3, 5, 24
TOL = dict(rtol=1e-5, atol=1e-5)


def _problem(seed: int, dtype=torch.float32):
    """Full logits (scaled so the max shift matters), targets with two ignored positions, an output gradient."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(BATCH, SEQ, VOCAB, generator=generator) * 20).to(dtype)
    target = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    target[0, 1] = target[2, 4] = -100
    grad_output = torch.randn(BATCH, SEQ, generator=generator).to(dtype)
    return logits, target, grad_output


def _shard(full: torch.Tensor, group) -> torch.Tensor:
    return full.chunk(dist.get_world_size(group), dim=-1)[dist.get_rank(group)]


def _check_against_gathered(label_smoothing, ignore_index, process_group=None):
    group = parallel_state.get_tensor_model_parallel_group() if process_group is None else process_group
    # DP replicas get different problems: a TP group must not depend on any other group's data.
    logits, target, grad_output = _problem(seed=100 + parallel_state.get_data_parallel_rank())
    if ignore_index != -100:
        target[target == -100] = ignore_index
    shard = _shard(logits, group).clone().requires_grad_()
    shard_before = shard.detach().clone()
    with comm.record_collectives() as forward_log:
        loss = parallel_cross_entropy(shard, target, label_smoothing, ignore_index=ignore_index, process_group=process_group)
    with comm.record_collectives() as backward_log:
        loss.backward(grad_output)

    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(
        full.view(-1, VOCAB), target.view(-1), reduction="none", label_smoothing=label_smoothing, ignore_index=ignore_index
    ).view(BATCH, SEQ)
    expected.backward(grad_output)

    torch.testing.assert_close(loss, expected, **TOL)
    torch.testing.assert_close(shard.grad, _shard(full.grad, group), **TOL)
    ignored = target == ignore_index
    assert (loss[ignored] == 0).all() and (shard.grad[ignored] == 0).all()
    assert torch.equal(shard.detach(), shard_before), "the caller's logits were modified"
    tokens = BATCH * SEQ
    if dist.get_world_size(group) > 1:
        # max, then (sum-exp, target logit[, sum of logits]) per token: never the vocabulary.
        assert forward_log.counts() == {"all_reduce": 2}
        assert [numel for _, _, numel in forward_log.calls] == [tokens, tokens * (3 if label_smoothing else 2)]
    else:
        assert forward_log.calls == []
    assert backward_log.calls == []


@pytest.mark.parametrize("world_size,tp", TOPOLOGIES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_cross_entropy_of_gathered_logits(pools, world_size, tp, label_smoothing):
    pools.run(world_size, tp, _check_against_gathered, label_smoothing, -100)


def test_ignore_index_inside_the_vocabulary(pools):
    """An ignore_index that is a real class id (as F.cross_entropy allows) masks that class's positions."""
    pools.run(2, 2, _check_against_gathered, 0.1, 7)


def test_process_group_argument_overrides_the_tp_group(pools):
    """With TP=1, the vocabulary sharded over the whole world through process_group still gives the full loss."""
    pools.run(2, 1, _check_against_gathered, 0.0, -100, dist.group.WORLD)


def _bf16_close_to_fp32():
    logits, target, grad_output = _problem(seed=5)
    shard = _shard(logits, parallel_state.get_tensor_model_parallel_group())
    bf16 = shard.to(torch.bfloat16).requires_grad_()
    loss = parallel_cross_entropy(bf16, target)
    loss.backward(grad_output.to(torch.bfloat16))
    full = logits.to(torch.bfloat16).float().requires_grad_()
    expected = F.cross_entropy(full.view(-1, VOCAB), target.view(-1), reduction="none").view(BATCH, SEQ)
    expected.backward(grad_output.to(torch.bfloat16).float())
    assert loss.dtype == bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=1e-2)
    shard_grad = _shard(full.grad, parallel_state.get_tensor_model_parallel_group())
    torch.testing.assert_close(bf16.grad.float(), shard_grad, rtol=1e-2, atol=1e-2)


def test_bfloat16_logits_keep_their_dtype_and_match_fp32(pools):
    pools.run(2, 2, _bf16_close_to_fp32)


def _bad_input_errors():
    logits, target, _ = _problem(seed=1)
    shard = _shard(logits, parallel_state.get_tensor_model_parallel_group())
    vocab = VOCAB
    out_of_range, negative = target.clone(), target.clone()
    out_of_range[1, 2] = vocab
    negative[0, 0] = -1
    cases = {
        "target shape": (shard, target[:, :-1], {}),
        "id == vocab": (shard, out_of_range, {}),
        "negative id": (shard, negative, {}),
        "float target": (shard, target.float(), {}),
        "label_smoothing > 1": (shard, target, {"label_smoothing": 1.5}),
        "integer logits": (shard.long(), target, {}),
    }
    raised = {}
    with comm.record_collectives() as log:
        for what, (x, t, kwargs) in cases.items():
            try:
                parallel_cross_entropy(x, t, **kwargs)
            except (InputShapeError, LossInputError) as error:
                raised[what] = (type(error).__name__, str(error))
            else:
                raised[what] = None
    assert log.calls == [], "validation must finish before any collective"
    # The group is still in step after the errors: a valid call works.
    parallel_cross_entropy(shard, target)
    return raised


def test_bad_input_raises_the_same_typed_error_on_every_rank(pools):
    per_rank = pools.run(2, 2, _bad_input_errors)
    assert per_rank[0] == per_rank[1]
    raised = per_rank[0]
    assert raised["target shape"][0] == "InputShapeError"
    for what in ("id == vocab", "negative id", "float target", "label_smoothing > 1", "integer logits"):
        assert raised[what] is not None and raised[what][0] == "LossInputError", what
    assert "outside the vocabulary [0, 24)" in raised["id == vocab"][1]
    assert "ignore_index" in raised["negative id"][1]

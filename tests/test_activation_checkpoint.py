"""Activation checkpointing at TP=2 with sequence parallelism and dropout inside and outside the RNG tracker's fork.

The checkpointed model must give the same loss, input gradient, parameter gradients
and RNG streams (tracker and default generator) as the same model without
checkpointing, bit for bit, over two steps; plain torch checkpointing, which does not
replay the tracker, must not (the test can tell the difference). With dropout off both
match the unsharded torch.nn model. A wrapped model keeps its state-dict and
parameter names, so checkpoints load into it with or without wrappers.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from models import expected_shard, same_seed_twins
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import LayerConfigError
from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear, load, save
from neuronx_distributed.parallel_layers.grads import allreduce_sequence_parallel_gradients
from neuronx_distributed.parallel_layers.layer_norm import LayerNorm
from neuronx_distributed.parallel_layers.random import get_rng_state_tracker, model_parallel_manual_seed
from neuronx_distributed.utils.activation_checkpoint import (
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

HIDDEN, FFN, BATCH, SEQ, SEED = 8, 16, 2, 8, 31
TOL = dict(rtol=1e-5, atol=1e-5)


class DropoutBlock(nn.Module):
    """norm -> fc1 (Column) -> GELU -> dropout in the tracker's fork -> fc2 (Row) -> dropout, on `[seq, batch, hidden]`."""

    def __init__(self, parallel: bool, p: float):
        super().__init__()
        self.parallel, self.p = parallel, p
        if parallel:
            self.norm = LayerNorm(HIDDEN, sequence_parallel_enabled=True)
            self.fc1 = ColumnParallelLinear(HIDDEN, FFN, gather_output=False, sequence_parallel_enabled=True)
            self.fc2 = RowParallelLinear(FFN, HIDDEN, input_is_parallel=True, sequence_parallel_enabled=True)
        else:
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        h = F.gelu(self.fc1(self.norm(x)))
        fork = get_rng_state_tracker().fork() if self.parallel else torch.enable_grad()
        with fork:  # sharded activations: a different mask on each TP rank
            h = F.dropout(h, self.p, training=True)
        return x + F.dropout(self.fc2(h), self.p, training=True)


class Stack(nn.Module):
    def __init__(self, parallel: bool, p: float = 0.25):
        super().__init__()
        self.blocks = nn.ModuleList([DropoutBlock(parallel, p) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _inputs():
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    generator = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    cotangent = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    return x, cotangent, x.chunk(tp_size)[tp_rank], cotangent.chunk(tp_size)[tp_rank]


def _steps(model, steps: int = 2):
    """Loss, input gradient and parameter gradients of each step, and the RNG streams after them."""
    _, _, x, cotangent = _inputs()
    model_parallel_manual_seed(SEED)
    results = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        local = x.clone().requires_grad_(True)
        loss = (model(local) * cotangent).sum()
        loss.backward()
        allreduce_sequence_parallel_gradients(torch.optim.SGD(model.parameters(), lr=0.0))
        results.append((loss.detach(), local.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
    streams = (torch.get_rng_state(), {name: state["cpu"] for name, state in get_rng_state_tracker().get_states().items()})
    return results, streams


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def _built(seed: int, wrap=None, p: float = 0.25) -> nn.Module:
    torch.manual_seed(seed)
    model = Stack(parallel=True, p=p)
    if wrap is not None:
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, DropoutBlock))
    return model


def _case_checkpointed_equals_plain():
    plain = _steps(_built(SEED))
    checkpointed_model = _built(SEED, wrap=checkpoint_wrapper)
    assert [type(block) for block in checkpointed_model.blocks] == [CheckpointWrapper] * 2
    checkpointed = _steps(checkpointed_model)
    assert _equal(plain, checkpointed)
    # torch's checkpoint alone restores the default generator but not the tracker: its masks inside the fork differ.
    torch_only = functools.partial(checkpoint_wrapper, checkpoint_fn=functools.partial(torch_checkpoint, use_reentrant=False))
    (first_step, *_), _ = _steps(_built(SEED, wrap=torch_only))
    assert torch.equal(first_step[0], plain[0][0][0])  # the forward is the same
    assert not _equal(first_step[2], plain[0][0][2])  # its recomputed backward is not
    return parallel_state.get_tensor_model_parallel_rank()


def test_checkpointed_tp_sp_block_with_dropout_equals_plain_bit_for_bit(pools):
    assert pools.run(2, 2, _case_checkpointed_equals_plain) == [0, 1]


def _case_dropout_off_matches_unsharded():
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    reference, model = same_seed_twins(functools.partial(Stack, p=0.0), SEED)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, DropoutBlock))
    x, cotangent, _, _ = _inputs()
    full = x.clone().requires_grad_(True)
    reference_loss = (reference(full) * cotangent).sum()
    reference_loss.backward()
    [(loss, input_grad, grads)], _ = _steps(model, steps=1)
    torch.testing.assert_close(_summed(loss), reference_loss.detach(), **TOL)
    torch.testing.assert_close(input_grad, full.grad.chunk(tp_size)[tp_rank], **TOL)
    for name, param in model.named_parameters():
        expected = expected_shard(dict(reference.named_parameters())[name].grad, param, tp_rank, tp_size)
        torch.testing.assert_close(grads[name], expected, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    return tp_rank


def _summed(loss: torch.Tensor) -> torch.Tensor:
    """The loss over the whole sequence: each TP rank holds its chunk's part."""
    total = loss.clone()
    torch.distributed.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total


def test_checkpointed_model_with_dropout_off_matches_unsharded(pools):
    assert pools.run(2, 2, _case_dropout_off_matches_unsharded) == [0, 1]


def _case_names_unchanged(folder: str):
    plain, wrapped = _built(SEED), _built(SEED + 1, wrap=checkpoint_wrapper)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [n for n, _ in wrapped.named_buffers()] == [n for n, _ in plain.named_buffers()]
    assert {n for n, _ in wrapped.named_modules()} == {n for n, _ in plain.named_modules()}
    assert wrapped.blocks[0].fc1 is wrapped.blocks[0].wrapped_module.fc1  # attributes reach the wrapped module
    # torch's own state dicts load either way.
    wrapped.load_state_dict(plain.state_dict())
    assert _equal(wrapped.state_dict(), plain.state_dict())
    plain.load_state_dict(_built(SEED + 2, wrap=checkpoint_wrapper).state_dict())
    assert _equal(plain.state_dict(), _built(SEED + 2).state_dict())
    # And so do sharded checkpoints, both ways.
    save(wrapped.state_dict(), folder, model_key=None)
    fresh = _built(SEED + 3)
    load(folder, fresh, model_key=None)
    assert _equal(fresh.state_dict(), wrapped.state_dict())
    save(_built(SEED + 4).state_dict(), folder, model_key=None)
    load(folder, wrapped, model_key=None)
    assert _equal(wrapped.state_dict(), _built(SEED + 4).state_dict())
    return parallel_state.get_tensor_model_parallel_rank()


def test_wrapped_model_keeps_its_names_and_loads_either_way(pools, tmp_path):
    assert pools.run(2, 2, _case_names_unchanged, str(tmp_path / "ckpt")) == [0, 1]


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(LayerConfigError, match="takes a torch.nn.Module"):
        checkpoint_wrapper("not a module")
    with pytest.raises(LayerConfigError, match="sets use_reentrant itself"):
        checkpoint_wrapper(nn.Linear(2, 2), use_reentrant=True)
    with pytest.raises(LayerConfigError, match="takes a torch.nn.Module"):
        apply_activation_checkpointing([nn.Linear(2, 2)])

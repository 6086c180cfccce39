"""modules.qkv_linear against the unsharded torch layers: KV heads replicated across TP ranks.

Every sharded layer is compared with the TP=1 torch model built from the same seed:
forward outputs, input gradients, weight gradients (the copies of a head each hold the
sum over the copies, as the tied weight of the unsharded model does), one SGD step and
the forward after it. The expected layout is computed here from the definition (rank r
holds replicated heads r*K .. r*K+K-1, replicated head j being logical head j // m).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import LayerConfigError
from neuronx_distributed.modules.qkv_linear import ReplicatedKVColumnParallelLinear

HIDDEN, SEQ, BATCH, LR = 8, 3, 2, 0.1
TOL = dict(rtol=1e-5, atol=1e-5)


def _replicated_heads(num_heads: int, multiplier: int) -> list[int]:
    """The logical head of each replicated head, in stored order (each head `multiplier` times in a row)."""
    return [head for head in range(num_heads) for _ in range(multiplier)]


def _local_heads(num_heads: int, multiplier: int, rank: int, world: int) -> list[int]:
    per_rank = num_heads * multiplier // world
    return _replicated_heads(num_heads, multiplier)[rank * per_rank:(rank + 1) * per_rank]


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([head * head_dim + d for head in heads for d in range(head_dim)])


def _tp():
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


def _input(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=generator).requires_grad_()


def _cotangent(seed: int, width: int) -> torch.Tensor:
    """The same random [SEQ, BATCH, width] tensor on every rank (what a downstream layer would send back)."""
    return torch.randn(SEQ, BATCH, width, generator=torch.Generator().manual_seed(seed + 1))


def _sgd(params) -> None:
    with torch.no_grad():
        for param in params:
            param -= LR * param.grad


def kv_projection_matches_linear(num_heads: int, head_dim: int, multiplier: int, seed: int, bias: bool = True):
    rank, world = _tp()
    torch.manual_seed(seed)
    reference = nn.Linear(HIDDEN, num_heads * head_dim, bias=bias)
    torch.manual_seed(seed)
    layer = ReplicatedKVColumnParallelLinear(HIDDEN, num_heads, head_dim, bias=bias, kv_size_multiplier=multiplier)
    local = _rows(_local_heads(num_heads, multiplier, rank, world), head_dim)
    stored = _rows(_replicated_heads(num_heads, multiplier), head_dim)  # every rank's rows, in rank order
    assert torch.equal(layer.weight, reference.weight[local])
    x, x_ref = _input(seed), _input(seed)
    # Each rank's copy feeds its own downstream computation: the loss sums over every stored copy.
    cotangent = _cotangent(seed, len(stored))
    mine = cotangent[..., rank * len(local):(rank + 1) * len(local)]
    output = layer(x)
    torch.testing.assert_close(output, reference(x_ref)[..., local], **TOL)
    (output * mine).sum().backward()
    (reference(x_ref)[..., stored] * cotangent).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad[local], **TOL)
    if bias:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad[local], **TOL)
    _sgd(layer.parameters())
    _sgd(reference.parameters())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x_ref)[..., local], **TOL)


def kv_projection_from_linear(num_heads: int, head_dim: int, multiplier: int):
    rank, world = _tp()
    linear = nn.Linear(HIDDEN, num_heads * head_dim)
    layer = ReplicatedKVColumnParallelLinear.from_linear(linear, num_heads, head_dim, kv_size_multiplier=multiplier)
    local = _rows(_local_heads(num_heads, multiplier, rank, world), head_dim)
    assert torch.equal(layer.weight, linear.weight[local]) and torch.equal(layer.bias, linear.bias[local])
    with torch.device("meta"):
        meta = nn.Linear(HIDDEN, num_heads * head_dim)
    shell = ReplicatedKVColumnParallelLinear.from_linear(meta, num_heads, head_dim, kv_size_multiplier=multiplier)
    assert shell.weight.is_meta and tuple(shell.weight.shape) == (len(local), HIDDEN)


def kv_projection_refused(num_heads: int, multiplier: int) -> str:
    with pytest.raises(LayerConfigError) as refused:
        ReplicatedKVColumnParallelLinear(HIDDEN, num_heads, 4, kv_size_multiplier=multiplier)
    return str(refused.value)


# (TP size, KV heads, multiplier): every multiplier that fits 2 KV heads at TP 1, 2 and 4.
KV_CASES = [(1, 2, 1), (1, 2, 2), (2, 2, 1), (2, 2, 2), (4, 2, 2), (4, 2, 4), (4, 4, 1)]


@pytest.mark.parametrize("tp, heads, multiplier", KV_CASES)
def test_replicated_kv_projection_equals_linear(pools, tp, heads, multiplier):
    pools.run(tp, tp, kv_projection_matches_linear, heads, 3, multiplier, seed=tp * 10 + multiplier)
    pools.run(tp, tp, kv_projection_from_linear, heads, 3, multiplier)


def test_replicated_kv_projection_without_bias(pools):
    pools.run(4, 4, kv_projection_matches_linear, 2, 3, 2, seed=5, bias=False)


def test_multiplier_that_does_not_fit_is_refused_on_every_rank(pools):
    messages = pools.run(4, 4, kv_projection_refused, 2, 1)
    assert all("kv_size_multiplier=2" in message for message in messages)
    messages = pools.run(4, 4, kv_projection_refused, 3, 2)
    assert all("kv_size_multiplier=4" in message for message in messages)

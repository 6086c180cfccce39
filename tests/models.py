"""Small models built twice: with torch.nn layers (the reference) and with the TP layers.

Built with the same seed, the TP model's shards are slices of the reference's
parameters, parameter for parameter, under the same names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear, parallel_state
from neuronx_distributed.parallel_layers.layer_norm import LayerNorm


class MLP(nn.Module):
    """fc1 (Column, gather_output=False) -> GELU -> fc2 (Row, input_is_parallel=True); `pad` passed to both."""

    def __init__(self, hidden: int, ffn: int, parallel: bool, pad: bool = False):
        super().__init__()
        if parallel:
            self.fc1 = ColumnParallelLinear(hidden, ffn, gather_output=False, pad=pad)
            self.fc2 = RowParallelLinear(ffn, hidden, input_is_parallel=True, pad=pad)
        else:
            self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SequenceParallelMLP(nn.Module):
    """norm (LayerNorm) -> fc1 (Column) -> GELU -> fc2 (Row), sequence-parallel on `[seq, batch, hidden]`.

    The parallel block takes and returns this rank's chunk of the sequence; the reference
    takes and returns the whole sequence.
    """

    def __init__(self, hidden: int, ffn: int, parallel: bool):
        super().__init__()
        if parallel:
            self.norm = LayerNorm(hidden, sequence_parallel_enabled=True)
            self.fc1 = ColumnParallelLinear(hidden, ffn, gather_output=False, sequence_parallel_enabled=True)
            self.fc2 = RowParallelLinear(ffn, hidden, input_is_parallel=True, sequence_parallel_enabled=True)
        else:
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(hidden), nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class SelfAttention(nn.Module):
    """BERT-style self-attention as the seed shards it: Q, K, V Column layers, output Row layer.

    With `fused_qkv` one Column layer of stride 3 computes Q, K and V together.
    """

    def __init__(self, hidden: int, heads: int, parallel: bool, fused_qkv: bool = False):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_size() if parallel else 1
        self.heads, self.head_dim, self.fused_qkv = heads // tp, hidden // heads, fused_qkv
        names = ["qkv"] if fused_qkv else ["query", "key", "value"]
        width = 3 * hidden if fused_qkv else hidden
        for name in names:
            if parallel:
                layer = ColumnParallelLinear(hidden, width, gather_output=False, stride=3 if fused_qkv else 1)
            else:
                layer = nn.Linear(hidden, width)
            setattr(self, name, layer)
        self.output = RowParallelLinear(hidden, hidden, input_is_parallel=True) if parallel else nn.Linear(hidden, hidden)

    def _heads(self, x):
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x):
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        context = (scores.softmax(-1) @ v).transpose(1, 2).flatten(-2)
        return self.output(context)


def expected_shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of a reference tensor that a TP parameter must equal (independent of the library's own slicing)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    blocks = full.chunk(param.partition_stride * tp_size, dim=param.partition_dim)
    return torch.cat(blocks[tp_rank::tp_size], dim=param.partition_dim)


def same_seed_twins(build, seed: int) -> tuple[nn.Module, nn.Module]:
    """`build(parallel=False)` and `build(parallel=True)` from the same seed; each TP shard is checked to be
    exactly its slice of the reference's parameter (initialization equivalence, bit for bit)."""
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(seed)
    reference = build(parallel=False)
    torch.manual_seed(seed)
    model = build(parallel=True)
    ref_params, params = dict(reference.named_parameters()), dict(model.named_parameters())
    assert ref_params.keys() == params.keys()
    for name, param in params.items():
        assert torch.equal(param, expected_shard(ref_params[name], param, tp_rank, tp_size)), name
    return reference, model

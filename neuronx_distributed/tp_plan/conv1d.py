"""transformers' GPT-2 `Conv1D` (y = x W + b, W stored `[in, out]`) as column- and row-parallel layers in its own layout."""

from __future__ import annotations

import torch

from ..parallel_layers.layers import ColumnParallelLinear, RowParallelLinear
from ..parallel_layers.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)


def conv1d_type():
    """transformers' Conv1D class, or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ModuleNotFoundError as error:
        if error.name != "transformers":
            raise
        return None
    return Conv1D


class ColumnParallelConv1D(ColumnParallelLinear):
    """transformers' Conv1D (y = x W + b, W stored `[in, out]`) with W's output columns split across the TP group.

    Keeps Conv1D's layout, so the weight is sharded along dim 1 and its state-dict
    shape is the Hugging Face one. Built by `parallelize` from a Conv1D.
    """

    def __init__(self, conv, gather_output: bool, blocks: int, group):
        super().__init__(conv.nx, conv.nf, bias=True, gather_output=gather_output, dtype=conv.weight.dtype,
                         device="meta", stride=blocks, tensor_model_parallel_group=group)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        group = self.tensor_parallel_group
        output = torch.matmul(copy_to_tensor_model_parallel_region(input_, group), self.weight)
        if not self.gather_output:
            return output + self.bias
        return self._in_unsharded_order(gather_from_tensor_model_parallel_region(output, group)) + self.bias


class RowParallelConv1D(RowParallelLinear):
    """transformers' Conv1D with W's input rows (dim 0 of its `[in, out]` weight) split across the TP group."""

    def __init__(self, conv, input_is_parallel: bool, group):
        super().__init__(conv.nx, conv.nf, bias=True, input_is_parallel=input_is_parallel, dtype=conv.weight.dtype,
                         device="meta", tensor_model_parallel_group=group)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        group = self.tensor_parallel_group
        if not self.input_is_parallel:
            input_ = scatter_to_tensor_model_parallel_region(input_, group)
        return reduce_from_tensor_model_parallel_region(torch.matmul(input_, self.weight), group) + self.bias

"""move_model_to_device to the test device and back keeps values and every attribute of parameters and buffers.

"meta" is a second target on any machine: like a move to a GPU, it makes new tensor
objects, so the CPU run proves that the attributes are carried over.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuronx_distributed.parallel_layers import move_model_to_device
from neuronx_distributed.parallel_layers.utils import set_tensor_model_parallel_attributes


def _weight_loader(param, full):
    param.data.copy_(full)


class Marked(nn.Module):
    """A parameter marked as a TP shard with a weight_loader, and a marked buffer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1, 2)
        self.weight.weight_loader = _weight_loader
        self.weight.sequence_parallel_enabled = True
        self.register_buffer("cache", torch.arange(5.0))
        self.cache.note = "kv"


def _marks(model: Marked) -> list:
    return [
        (model.weight.tensor_model_parallel, model.weight.partition_dim, model.weight.partition_stride,
         model.weight.num_partitions, model.weight.weight_loader, model.weight.sequence_parallel_enabled),
        model.cache.note,
    ]


@pytest.mark.parametrize("swap", [False, True], ids=["assign", "swap_tensors"])
@pytest.mark.parametrize("target", ["device", "meta"])
def test_move_keeps_values_and_attributes(device, target, swap):
    target = device if target == "device" else target
    model = Marked()
    expected_marks, weight, cache = _marks(model), model.weight.detach().clone(), model.cache.clone()
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        moved = move_model_to_device(model, target)
        assert moved is model and model.weight.device.type == target and model.cache.device.type == target
        assert _marks(model) == expected_marks
        if target != "meta":
            # Back to the host: the copies are complete when it returns, the attributes still there.
            move_model_to_device(model, "cpu")
            assert torch.equal(model.weight.detach(), weight) and torch.equal(model.cache, cache)
            assert _marks(model) == expected_marks
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)

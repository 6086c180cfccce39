"""Move a model between devices keeping the tensor-parallel attributes of its parameters."""

from __future__ import annotations

import torch
from torch import nn

from .utils import tensor_model_parallel_attributes


def move_model_to_device(model: nn.Module, device) -> nn.Module:
    """`model.to(device)` that keeps `tensor_model_parallel`, `partition_dim`, `partition_stride`."""
    attributes = {name: tensor_model_parallel_attributes(p) for name, p in model.named_parameters()}
    model.to(torch.device(device))
    for name, param in model.named_parameters():
        for attr, value in attributes[name].items():
            setattr(param, attr, value)
    return model

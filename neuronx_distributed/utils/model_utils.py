"""Model construction helpers of upstream NxD: build a model's parameters directly on a device."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.module import register_module_buffer_registration_hook, register_module_parameter_registration_hook

from ..parallel_layers.utils import move_model_to_device

__all__ = ["init_on_device", "move_model_to_device"]


def _parameter_on(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """`param` moved to `device` as the same Parameter class, keeping requires_grad and its Python attributes."""
    moved = type(param)(param.detach().to(device), requires_grad=param.requires_grad)
    moved.__dict__.update(param.__dict__)
    return moved


@contextlib.contextmanager
def init_on_device(device, include_buffers: bool = False, force_custom_init_on_device: bool = False):
    """Inside the block, every parameter a module registers lands on `device` (e.g. "meta" to allocate nothing).

    With `include_buffers`, registered buffers land there too and tensors created
    without a device inside the block are created on `device` directly (PyTorch's
    `with torch.device(...)`). Without it, buffers stay where the module puts them.
    Parameters keep their class, `requires_grad` and attributes such as
    `tensor_model_parallel` (upstream's accelerate-based path turns
    `requires_grad=False` into True). `force_custom_init_on_device` picks between
    upstream's two implementations; there is one here, so it changes nothing.
    Uses PyTorch's global registration hooks rather than patching `nn.Module`.
    """
    device = torch.device(device)

    def on_parameter(module, name, param):
        return None if param.device == device else _parameter_on(param, device)

    def on_buffer(module, name, buffer):
        return None if buffer is None or buffer.device == device else buffer.to(device)

    with contextlib.ExitStack() as stack:
        stack.callback(register_module_parameter_registration_hook(on_parameter).remove)
        if include_buffers:
            stack.callback(register_module_buffer_registration_hook(on_buffer).remove)
            stack.enter_context(device)
        yield

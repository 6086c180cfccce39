"""`NxDModel`: the model that `initialize_parallel_model` returns, a thin wrapper that keeps the wrapped module's names."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NxDModel(nn.Module):
    """Wraps `module` (upstream NxD's trainer model) without adding a level to its names.

    `named_parameters`, `named_buffers`, `named_modules`, `state_dict` and
    `load_state_dict` are the wrapped module's own, so optimizers, checkpoints and
    `parallel_layers.save/load` see the same keys as for the bare module; other
    attributes are looked up on the wrapped module. `nxd_config` is the
    `neuronx_distributed_config` it was built with. Pipeline parallelism is not
    implemented here, so `local_modules()` is always `[module]`.
    """

    def __init__(self, module: nn.Module, nxd_config: dict):
        super().__init__()
        self.module = module
        self.nxd_config = nxd_config
        self.train()

    def __repr__(self) -> str:
        return f"NxDModel({self.module!r})"

    def local_modules(self) -> list[nn.Module]:
        """The modules this rank holds (the one wrapped module: there are no pipeline stages)."""
        return [self.module]

    def original_module(self) -> nn.Module:
        return self.module

    def run_train(self, *args, **kwargs) -> torch.Tensor:
        """Forward to a loss, backward it, and return it (upstream's training step without a pipeline)."""
        loss = self.forward(*args, **kwargs)
        loss.backward()
        return loss

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        return self.module.named_buffers(*args, **kwargs)

    def named_children(self):
        return self.module.named_children()

    def named_modules(self, *args, **kwargs):
        return self.module.named_modules(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the wrapped module (its own `dtype`, as Hugging Face models have, else its first parameter's)."""
        own = getattr(self.module, "dtype", None)
        if isinstance(own, torch.dtype):
            return own
        return next(self.module.parameters()).dtype

    @property
    def config(self):
        return self.module.config

    @property
    def name_or_path(self):
        return self.module.name_or_path

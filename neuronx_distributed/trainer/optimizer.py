"""`NxDOptimizer`: the optimizer that `initialize_parallel_optimizer` returns; its `step()` does the parallel bookkeeping."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..parallel_layers import grads


class NxDOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer` (a torch optimizer or a NeuronZero1Optimizer) for the trainer config `nxd_config`.

    `step()` first sums the gradients of sequence-parallel parameters over the TP
    group (when `sequence_parallel`); then, without ZeRO-1, averages every gradient
    over the DP group and clips by the norm of the whole unsharded model
    (`parallel_layers.grads`) before stepping; with ZeRO-1 the wrapped optimizer
    does both. `grad_norm` is the norm of the last step (None without clipping).
    `param_groups`, `state`, `defaults`, `state_dict` and `load_state_dict` are the
    wrapped optimizer's, so learning-rate schedulers work on this object.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, nxd_config: dict):
        # torch.optim.Optimizer.__init__ is not called: the wrapped optimizer owns the groups and the state.
        self.optimizer = optimizer
        self.nxd_config = nxd_config
        self._grad_norm: torch.Tensor | None = None
        self.params = [p for group in self.param_groups for p in group["params"]]

    def __repr__(self) -> str:
        return f"NxDOptimizer({self.optimizer!r})"

    @property
    def grad_norm(self) -> torch.Tensor | None:
        return self._grad_norm

    @property
    def zero1_enabled(self) -> bool:
        return self.nxd_config["optimizer_config"]["zero_one_enabled"]

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, param_groups):
        self.optimizer.param_groups = param_groups

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)
        self.params = [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable | None = None):
        if self.nxd_config["sequence_parallel"]:
            grads.allreduce_sequence_parallel_gradients(self)
        optimizer_config = self.nxd_config["optimizer_config"]
        if not self.zero1_enabled:
            grads.all_reduce_gradients(self.params)
            if optimizer_config["grad_clipping"]:
                self._grad_norm = grads.clip_grad_norm(self.params, optimizer_config["max_grad_norm"])
        result = self.optimizer.step(closure)
        if self.zero1_enabled:
            self._grad_norm = self.optimizer.grad_norm
        return result

"""Upstream NxD's `AdamW_FP32OptimParams`: AdamW whose moment estimates stay in float32 for low-precision parameters."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from ..errors import OptimizerConfigError


class AdamW_FP32OptimParams(torch.optim.Optimizer):  # noqa: N801 - upstream's name
    """AdamW (the Hugging Face formulation) with float32 (or wider) moments for any parameter dtype.

    For a bfloat16 parameter the gradient is upcast, both moment estimates are kept in
    float32 and the update is computed in float32 before it is written back (rounded) to
    the parameter. Wrap it in `NeuronZero1Optimizer(..., optimizer_dtype=torch.float32)`
    to also keep float32 master weights.

    The algorithm is upstream's: with `correct_bias` the bias corrections go into the step
    size (so `eps` is added to the uncorrected root of the second moment), and the decoupled
    weight decay `lr * weight_decay * p` is applied after the Adam update. (torch.optim.AdamW
    decays before the update and adds `eps` to the corrected root.) Upstream picks fp64
    moments from the XLA_DOWNCAST_BF16 environment variable; here the moment dtype is
    float32, or the parameter's dtype when that is wider, with no switch. Bad arguments
    raise OptimizerConfigError (a ValueError, as upstream's checks raise).
    `no_deprecation_warning`, `differentiable` and `capturable` are accepted for
    upstream's signature; `differentiable=True` is refused.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = True,
        differentiable: bool = False,
        capturable: bool = False,
    ):
        if not _is_real(lr) or lr < 0.0:
            raise OptimizerConfigError(f"lr must be a number >= 0, got {lr!r}.")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise OptimizerConfigError(f"betas must be two numbers in [0, 1), got {betas!r}.")
        if not _is_real(eps) or eps < 0.0:
            raise OptimizerConfigError(f"eps must be a number >= 0, got {eps!r}.")
        if not _is_real(weight_decay) or weight_decay < 0.0:
            raise OptimizerConfigError(f"weight_decay must be a number >= 0, got {weight_decay!r}.")
        if differentiable:
            raise OptimizerConfigError("differentiable=True is not supported; leave it False.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=bool(correct_bias),
                        capturable=capturable)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise OptimizerConfigError("AdamW_FP32OptimParams does not take sparse gradients; use torch.optim.SparseAdam.")
                state = self.state[param]
                compute_dtype = torch.promote_types(param.dtype, torch.float32)
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=compute_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=compute_dtype)
                grad = param.grad.to(compute_dtype)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                updated = param.to(compute_dtype)
                updated.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    updated.add_(updated, alpha=-group["lr"] * group["weight_decay"])
                param.copy_(updated)
        return loss


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""`initialize_parallel_model` and `initialize_parallel_optimizer`: a model and an optimizer built from the trainer config."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import OptimizerConfigError, TrainerConfigError
from ..optimizer import NeuronZero1Optimizer
from ..parallel_layers import parallel_state
from ..parallel_layers.utils import move_model_to_device
from ..utils import get_device
from ..utils.activation_checkpoint import apply_activation_checkpointing
from ..utils.model_utils import init_on_device
from .config import check_config, checkpointed_classes, initialize_model_parallel_for
from .model import NxDModel
from .optimizer import NxDOptimizer


def initialize_parallel_model(nxd_config: dict, model_fn: Callable[..., nn.Module], include_buffers: bool = False,
                              *model_args, **model_kwargs) -> NxDModel:
    """Build `model_fn(*model_args, **model_kwargs)` for the config and return it as an `NxDModel`.

    Initializes model parallelism first when it is not (with the config's sizes);
    `model_fn` builds the parallel model (its layers read `parallel_state`). With
    `model_init_config['meta_device_init']` the model is built on the meta device
    (`include_buffers`: its buffers too, as `utils.model_utils.init_on_device`), then
    each module gets empty CPU tensors and `param_init_fn(module)` fills them. The
    model is then moved to this process's device (`utils.get_device()`) keeping its
    tensor-parallel attributes, and the classes of `activation_checkpoint_config` are
    wrapped for activation checkpointing.
    """
    config = check_config(nxd_config)
    if not callable(model_fn):
        raise TrainerConfigError(f"model_fn must be a function that returns the model, got {type(model_fn).__name__}.")
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel_for(config)
    init = config["model_init_config"]
    if init["meta_device_init"]:
        with init_on_device(torch.device("meta"), include_buffers=include_buffers):
            model = model_fn(*model_args, **model_kwargs)
        _materialize(model, init["param_init_fn"])
    else:
        model = model_fn(*model_args, **model_kwargs)
    if not isinstance(model, nn.Module):
        raise TrainerConfigError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}.")
    move_model_to_device(model, get_device())
    nxd_model = NxDModel(model, config)
    classes = checkpointed_classes(config, model)
    if classes:
        apply_activation_checkpointing(nxd_model, check_fn=lambda module: isinstance(module, classes))
    return nxd_model


@torch.no_grad()
def _materialize(model: nn.Module, param_init_fn: Callable[[nn.Module], None]) -> None:
    """Give every meta tensor of `model` CPU memory (keeping attributes and ties), then `param_init_fn(module)` each module."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_meta:
                if id(param) not in made:
                    empty = type(param)(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad)
                    empty.__dict__.update(param.__dict__)
                    made[id(param)] = empty
                setattr(module, name, made[id(param)])
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
        param_init_fn(module)


def initialize_parallel_optimizer(nxd_config: dict, optimizer_class: type[torch.optim.Optimizer], parameters,
                                  **defaults) -> NxDOptimizer:
    """`optimizer_class(parameters, **defaults)` for the config, as an `NxDOptimizer`.

    With `optimizer_config['zero_one_enabled']` it is a `NeuronZero1Optimizer` over
    the DP groups, clipping to `max_grad_norm` when `grad_clipping` (upstream leaves
    ZeRO-1 at its default norm of 1.0 whatever max_grad_norm says), with fp32 master
    weights (`use_master_weights`; always on here) and fp32 gradient reduction
    (`use_fp32_grad_acc`). Otherwise the plain optimizer, and `NxDOptimizer.step()`
    averages the gradients over the DP group and clips them.
    """
    config = check_config(nxd_config)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise OptimizerConfigError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}.")
    optimizer_config, mixed = config["optimizer_config"], config["mixed_precision_config"]
    if optimizer_config["zero_one_enabled"]:
        optimizer = NeuronZero1Optimizer(
            parameters,
            optimizer_class,
            grad_clipping=optimizer_config["grad_clipping"],
            max_norm=optimizer_config["max_grad_norm"],
            pin_layout=False,
            sharding_groups=parallel_state.get_data_parallel_group(as_list=True),
            grad_norm_groups=parallel_state.get_tensor_model_parallel_group(as_list=True),
            higher_cc_precision=mixed["use_fp32_grad_acc"],
            use_grad_acc_hook=mixed["use_fp32_grad_acc"],
            save_master_weights=mixed["use_master_weights_in_ckpt"],
            **defaults,
        )
    else:
        try:
            optimizer = optimizer_class(parameters, **defaults)
        except (TypeError, ValueError) as refused:
            raise OptimizerConfigError(f"{optimizer_class.__name__}(parameters, **defaults) refused: {refused}") from refused
    return NxDOptimizer(optimizer, config)

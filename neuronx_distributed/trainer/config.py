"""`neuronx_distributed_config`: the trainer config dict, checked and completed with upstream NxD's defaults.

Upstream fills missing keys with a warning and checks with asserts; here every
key is checked when the config is made, and an unknown argument, an unknown key
in a nested config, a wrong type or a combination that cannot work raises
TrainerConfigError (or UnsupportedParallelismError for pipeline, expert or
context parallelism above 1), saying what to pass instead.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..errors import TrainerConfigError, UnsupportedParallelismError
from ..parallel_layers import parallel_state

OPTIMIZER_DEFAULTS = {"zero_one_enabled": False, "grad_clipping": True, "max_grad_norm": 1.0}
MODEL_INIT_DEFAULTS = {"sequential_move_factor": 11, "meta_device_init": False, "param_init_fn": None}
MIXED_PRECISION_KEYS = ("use_master_weights", "use_fp32_grad_acc", "use_master_weights_in_ckpt")
FULL_CHECKPOINTING = "full"


def neuronx_distributed_config(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    context_parallel_size: int = 1,
    pipeline_config: dict | None = None,
    optimizer_config: dict | None = None,
    activation_checkpoint_config=None,
    pad_model: bool = False,
    sequence_parallel: bool = False,
    model_init_config: dict | None = None,
    lora_config=None,
    mixed_precision_config: dict | None = None,
    sequential_move_factor: int = 11,
    lnc_size: int = 1,
    **unknown,
) -> dict:
    """The config that `initialize_parallel_model` and `initialize_parallel_optimizer` take (a dict, as upstream).

    tensor_parallel_size: the TP degree. pipeline/expert/context_parallel_size: must
        be 1 (not implemented here). pipeline_config: only meaningful with pipeline
        parallelism; must be None or a dict.
    optimizer_config: keys `zero_one_enabled` (ZeRO-1 through NeuronZero1Optimizer,
        default False), `grad_clipping` (default True), `max_grad_norm` (default 1.0).
    activation_checkpoint_config: None (off), "full" (every layer class a Hugging Face
        model lists in `_no_split_modules`), or a torch.nn.Module subclass or a list of
        them, whose instances are checkpointed (`utils.activation_checkpoint`).
    pad_model: head padding of Hugging Face models; not implemented here, must be False.
    sequence_parallel: the model's layers run sequence-parallel (the model function
        builds them so); the optimizer then sums the gradients of the parameters marked
        `sequence_parallel_enabled` over the TP group before clipping.
    model_init_config: keys `meta_device_init` (build the model on the meta device,
        then give every module empty parameters on the CPU and call
        `param_init_fn(module)` on it), `param_init_fn`, and `sequential_move_factor`
        (Neuron-only: how many processes of a host move their model to the device at
        once; every process moves at once here, the value is checked and kept).
    lora_config: must be None (LoRA is not implemented here).
    mixed_precision_config: keys `use_master_weights` (fp32 master weights in the
        ZeRO-1 optimizer; default: zero_one_enabled), `use_fp32_grad_acc` (ZeRO-1
        reduces gradients in fp32; default: zero_one_enabled),
        `use_master_weights_in_ckpt` (default False; ZeRO-1 checkpoints always hold
        the master weights here). The first two need ZeRO-1.
    sequential_move_factor: the default of model_init_config's key. lnc_size:
        Neuron-only (logical NeuronCore size), checked and passed to
        `initialize_model_parallel`, which accepts it.

    Like upstream, model parallelism is initialized here when torch.distributed is.
    """
    if unknown:
        raise TrainerConfigError(
            f"neuronx_distributed_config got unknown argument(s) {sorted(unknown)}; its arguments are "
            "tensor_parallel_size, pipeline_parallel_size, expert_parallel_size, context_parallel_size, pipeline_config, "
            "optimizer_config, activation_checkpoint_config, pad_model, sequence_parallel, model_init_config, "
            "lora_config, mixed_precision_config, sequential_move_factor and lnc_size."
        )
    sizes = {
        "tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
        "expert_parallel_size": expert_parallel_size, "context_parallel_size": context_parallel_size,
        "sequential_move_factor": sequential_move_factor, "lnc_size": lnc_size,
    }
    for name, value in sizes.items():
        _positive_int(name, value)
    for name in ("pipeline_parallel_size", "expert_parallel_size", "context_parallel_size"):
        if sizes[name] != 1:
            raise UnsupportedParallelismError(f"{name}={sizes[name]}: only tensor and data parallelism are implemented; pass 1.")
    if pipeline_config is not None and not isinstance(pipeline_config, dict):
        raise TrainerConfigError(f"pipeline_config must be a dict or None, got {type(pipeline_config).__name__}.")
    if lora_config is not None:
        raise TrainerConfigError("lora_config: LoRA is not implemented here; pass None.")
    _flag("pad_model", pad_model)
    if pad_model:
        raise TrainerConfigError("pad_model=True: head padding is not implemented in the trainer here; pass False.")
    _flag("sequence_parallel", sequence_parallel)
    optimizer = _completed("optimizer_config", optimizer_config, OPTIMIZER_DEFAULTS)
    _flag("optimizer_config['zero_one_enabled']", optimizer["zero_one_enabled"])
    _flag("optimizer_config['grad_clipping']", optimizer["grad_clipping"])
    max_norm = optimizer["max_grad_norm"]
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise TrainerConfigError(f"optimizer_config['max_grad_norm'] must be a positive number, got {max_norm!r}.")
    zero1 = optimizer["zero_one_enabled"]
    mixed = _completed(
        "mixed_precision_config", mixed_precision_config,
        {"use_master_weights": zero1, "use_fp32_grad_acc": zero1, "use_master_weights_in_ckpt": False},
    )
    for key in MIXED_PRECISION_KEYS:
        _flag(f"mixed_precision_config[{key!r}]", mixed[key])
    if not zero1 and (mixed["use_master_weights"] or mixed["use_fp32_grad_acc"]):
        raise TrainerConfigError(
            "mixed_precision_config: use_master_weights and use_fp32_grad_acc need ZeRO-1; set "
            "optimizer_config={'zero_one_enabled': True} or set them to False."
        )
    init = _completed("model_init_config", model_init_config, {**MODEL_INIT_DEFAULTS, "sequential_move_factor": sequential_move_factor})
    _positive_int("model_init_config['sequential_move_factor']", init["sequential_move_factor"])
    _flag("model_init_config['meta_device_init']", init["meta_device_init"])
    if init["meta_device_init"] and not callable(init["param_init_fn"]):
        raise TrainerConfigError(
            "model_init_config: meta_device_init=True needs param_init_fn, a function(module) that fills the "
            "module's own (empty) parameters."
        )
    _check_activation_checkpoint_config(activation_checkpoint_config)
    config = {
        **{name: value for name, value in sizes.items() if name != "sequential_move_factor"},
        "pipeline_config": pipeline_config,
        "optimizer_config": optimizer,
        "activation_checkpoint_config": activation_checkpoint_config,
        "pad_model": pad_model,
        "sequence_parallel": sequence_parallel,
        "model_init_config": init,
        "lora_config": lora_config,
        "mixed_precision_config": mixed,
    }
    if dist.is_initialized():
        initialize_model_parallel_for(config)
    return config


def initialize_model_parallel_for(config: dict) -> None:
    """`parallel_state.initialize_model_parallel` with the config's sizes (nothing when it already is, alike)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config["tensor_parallel_size"],
        pipeline_model_parallel_size=config["pipeline_parallel_size"],
        expert_model_parallel_size=config["expert_parallel_size"],
        lnc_size=config["lnc_size"],
        context_parallel_size=config["context_parallel_size"],
    )


def check_config(config) -> dict:
    """`config` if it is a dict that `neuronx_distributed_config` made; TrainerConfigError otherwise."""
    required = ("tensor_parallel_size", "optimizer_config", "mixed_precision_config", "model_init_config", "sequence_parallel")
    if not isinstance(config, dict) or any(key not in config for key in required):
        raise TrainerConfigError("pass the config that neuronx_distributed_config(...) returned.")
    return config


def checkpointed_classes(config: dict, model: nn.Module) -> tuple[type, ...]:
    """The module classes that activation checkpointing wraps for `config`, given the built model."""
    setting = config["activation_checkpoint_config"]
    if setting is None:
        return ()
    if setting == FULL_CHECKPOINTING:
        names = set(getattr(model, "_no_split_modules", None) or ())
        classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
        if not classes:
            raise TrainerConfigError(
                "activation_checkpoint_config='full' checkpoints the layer classes a Hugging Face model lists in "
                f"_no_split_modules, and {type(model).__name__} lists none it contains; pass the layer class instead."
            )
        return classes
    return tuple(setting) if isinstance(setting, (list, tuple)) else (setting,)


def _check_activation_checkpoint_config(setting) -> None:
    if setting is None or setting == FULL_CHECKPOINTING:
        return
    classes = list(setting) if isinstance(setting, (list, tuple)) else [setting]
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise TrainerConfigError(
            "activation_checkpoint_config must be None, 'full', or a torch.nn.Module subclass (or a non-empty list "
            f"of them), got {setting!r}."
        )


def _completed(name: str, given: dict | None, defaults: dict) -> dict:
    """A copy of `given` with the missing keys from `defaults`; unknown keys raise."""
    if given is None:
        return dict(defaults)
    if not isinstance(given, dict):
        raise TrainerConfigError(f"{name} must be a dict or None, got {type(given).__name__}.")
    unknown = sorted(set(given) - set(defaults), key=str)
    if unknown:
        raise TrainerConfigError(f"{name} has unknown key(s) {unknown}; its keys are {sorted(defaults)}.")
    return {**defaults, **given}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainerConfigError(f"{name} must be a positive int, got {value!r}.")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TrainerConfigError(f"{name} must be True or False, got {value!r}.")


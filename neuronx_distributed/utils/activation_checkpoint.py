"""Activation checkpointing: keep a module's inputs, not its activations, and recompute its forward in backward.

`checkpoint_wrapper(module)` returns a module that runs `module` under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`;
`apply_activation_checkpointing(model, check_fn=...)` swaps such a wrapper in for
every submodule that `check_fn` selects (upstream NxD's names and arguments).

The recomputed forward draws exactly the random numbers the first one drew, so
gradients equal those of the run without checkpointing bit for bit: torch restores
the default generators (dropout on replicated activations), and the wrapper
restores the states of the TP RNG tracker (`parallel_layers.random`), so that
dropout inside `get_rng_state_tracker().fork()` draws the same masks again; after
the recomputation the tracker is back where the rest of the step left it.
Collectives inside the module (tensor and sequence parallel layers) are issued
again in backward, in the same order on every rank.

A wrapped model keeps its parameter, buffer, module and state-dict names: the
wrapper adds no level to them, so checkpoints load into the model with or without
wrappers, and optimizers built from `named_parameters()` see the same names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..errors import LayerConfigError
from ..parallel_layers.random import get_rng_state_tracker

_WRAPPED = "_checkpoint_wrapped_module"
_PREFIX = _WRAPPED + "."


def _tracker_replay_contexts():
    """(forward context, recompute context) for torch's checkpoint: the recompute sees the tracker as the forward did."""
    tracker = get_rng_state_tracker()
    at_forward: dict = {}

    @contextlib.contextmanager
    def forward():
        at_forward.update(tracker.get_states())
        yield

    @contextlib.contextmanager
    def recompute():
        live = tracker.get_states()
        tracker.set_states(dict(at_forward))
        try:
            yield
        finally:
            tracker.set_states(live)

    return forward(), recompute()


class CheckpointWrapper(nn.Module):
    """Runs the wrapped module under activation checkpointing; names and attributes are the wrapped module's."""

    def __init__(self, module: nn.Module, checkpoint_fn: Callable | None = None, **checkpoint_fn_kwargs):
        super().__init__()
        setattr(self, _WRAPPED, module)
        self.checkpoint_fn = checkpoint_fn
        self.checkpoint_fn_kwargs = checkpoint_fn_kwargs
        self.register_state_dict_post_hook(_drop_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapper_prefix)

    @property
    def wrapped_module(self) -> nn.Module:
        return getattr(self, _WRAPPED)

    def forward(self, *args, **kwargs):
        if self.checkpoint_fn is not None:
            return self.checkpoint_fn(self.wrapped_module, *args, **self.checkpoint_fn_kwargs, **kwargs)
        return torch_checkpoint(
            self.wrapped_module, *args, use_reentrant=False, context_fn=_tracker_replay_contexts,
            **self.checkpoint_fn_kwargs, **kwargs,
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped_module, name)

    def __getitem__(self, key):
        return self.wrapped_module[key]

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """The wrapped module's modules under this wrapper's own name (the wrapper first)."""
        if memo is None:
            memo = set()
        if self not in memo:
            if remove_duplicate:
                memo.add(self)
            yield prefix, self
        yield from self.wrapped_module.named_modules(memo, prefix, remove_duplicate)

    def extra_repr(self) -> str:
        return "activation checkpointing"


def _drop_wrapper_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + key[len(prefix + _PREFIX):]] = state_dict.pop(key)


def _add_wrapper_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _PREFIX)]:
        state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


def checkpoint_wrapper(
    module: nn.Module,
    checkpoint_impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT,
    checkpoint_fn: Callable | None = None,
    **checkpoint_fn_kwargs,
) -> nn.Module:
    """`module` wrapped so that its activations are recomputed in backward instead of kept.

    `checkpoint_impl`: upstream's choice of torch's reentrant or non-reentrant
    checkpoint (upstream forces the reentrant one on XLA). Both run the
    non-reentrant one here: it is the one that can replay the RNG tracker, and it
    also gives gradients to inputs that do not require grad. `checkpoint_fn`: a
    replacement for torch's checkpoint, called as
    `checkpoint_fn(module, *args, **checkpoint_fn_kwargs, **kwargs)` (the tracker
    replay is then its business); otherwise `checkpoint_fn_kwargs` go to
    `torch.utils.checkpoint.checkpoint` (e.g. `preserve_rng_state`,
    `determinism_check`).
    """
    if not isinstance(module, nn.Module):
        raise LayerConfigError(f"checkpoint_wrapper takes a torch.nn.Module, got {type(module).__name__}.")
    if not isinstance(checkpoint_impl, CheckpointImpl):
        raise LayerConfigError(f"checkpoint_impl must be a CheckpointImpl, got {checkpoint_impl!r}.")
    if checkpoint_fn is None:
        for taken in ("use_reentrant", "context_fn"):
            if taken in checkpoint_fn_kwargs:
                raise LayerConfigError(
                    f"checkpoint_wrapper sets {taken} itself (non-reentrant, replaying the RNG tracker); drop it, "
                    "or pass checkpoint_fn to run your own checkpoint function."
                )
    return CheckpointWrapper(module, checkpoint_fn, **checkpoint_fn_kwargs)


def apply_activation_checkpointing(
    model: nn.Module,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] = checkpoint_wrapper,
    check_fn: Callable[[nn.Module], bool] = lambda _: True,
) -> None:
    """Wrap, in place, every submodule of `model` for which `check_fn(submodule)` is True.

    The root itself is never wrapped. For an `NxDModel` its local modules are
    searched. Unlike upstream (which wraps matches nested inside other matches too,
    recomputing them twice), a selected submodule is wrapped once and not searched
    further: the gradients are the same, with one recomputation per module.
    """
    from ..trainer.model import NxDModel

    if not isinstance(model, nn.Module):
        raise LayerConfigError(f"apply_activation_checkpointing takes a torch.nn.Module, got {type(model).__name__}.")
    roots = model.local_modules() if isinstance(model, NxDModel) else [model]
    for root in roots:
        _wrap_children(root, checkpoint_wrapper_fn, check_fn)


def _wrap_children(module: nn.Module, wrapper_fn, check_fn) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, CheckpointWrapper):
            continue
        if check_fn(child):
            setattr(module, name, wrapper_fn(child))
        else:
            _wrap_children(child, wrapper_fn, check_fn)

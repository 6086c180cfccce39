"""Find the tensor-parallel attributes of a parameter from any tensor that views its storage.

`model.state_dict()` returns detached tensors, which do not carry the attributes
that `set_tensor_model_parallel_attributes` puts on the parameters. Every
parameter so marked is registered here (weakly), and the checkpoint writer finds
a detached tensor's sharding by matching its storage, offset, shape and strides.
"""

from __future__ import annotations

import weakref

import torch

_marked_parameters: weakref.WeakSet = weakref.WeakSet()


def register(param: torch.Tensor) -> None:
    """Remember `param` (weakly) as carrying tensor-parallel attributes."""
    _marked_parameters.add(param)


def _view_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))


def parameter_lookup() -> dict[tuple, torch.Tensor]:
    """Snapshot of the live registered parameters, keyed by the view of memory they occupy."""
    return {_view_key(param): param for param in list(_marked_parameters)}


def parameter_viewed_by(tensor: torch.Tensor, lookup: dict[tuple, torch.Tensor]) -> torch.Tensor | None:
    """The registered parameter whose memory `tensor` views exactly (e.g. its `state_dict()` entry), or None."""
    if tensor.data_ptr() == 0:
        return None
    return lookup.get(_view_key(tensor))

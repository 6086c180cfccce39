"""Where a checkpoint's state keeps the model's state dict: under its model key, or the state itself."""

from __future__ import annotations

import torch


def find_model_state(state, model_key: str | None, tensor_type: type = torch.Tensor) -> dict | None:
    """The model's state dict inside `state`: under `model_key`, or `state` itself when it is all tensors; else None.

    `tensor_type` is what a tensor is in `state`: `state_tree.TensorRef` in a checkpoint's decoded structure.
    """
    if not isinstance(state, dict):
        return None
    if model_key is not None and isinstance(state.get(model_key), dict):
        return state[model_key]
    if state and all(isinstance(value, tensor_type) for value in state.values()):
        return state
    return None

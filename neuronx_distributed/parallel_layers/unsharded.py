"""Unsharded checkpoints that users bring, read whole or one slice at a time.

A `torch.save` file (the state dict under `model_key`, or bare) is loaded with
`weights_only=True` and memory-mapped; a safetensors file or a Hugging Face model
folder (`model.safetensors`, or shards listed in `model.safetensors.index.json`)
is read through `safe_open(...).get_slice`, so a rank reads only its slice.
"""

from __future__ import annotations

import json
import os
import pickle

import torch
from safetensors import safe_open

from ..errors import CheckpointKeyError, CheckpointNotFoundError, UnsafeCheckpointError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _along(dim: int, start: int, stop: int) -> tuple:
    return (slice(None),) * dim + (slice(start, stop),)


class SafetensorsSource:
    """Tensors of one or more safetensors files; each read opens (maps) its file only for that read."""

    def __init__(self, files_by_key: dict[str, str]):
        self._files = files_by_key
        self._shapes = {}
        for path in sorted(set(files_by_key.values())):
            with safe_open(path, framework="pt") as file:
                for key in file.keys():
                    self._shapes[key] = list(file.get_slice(key).get_shape())
        missing = sorted(set(files_by_key) - set(self._shapes))
        if missing:
            raise CheckpointNotFoundError(f"the index names tensors that its files do not hold: {missing[:10]}; the download is incomplete.")

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, key: str) -> list[int]:
        return self._shapes[key]

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor `key`, or its rows start:stop along `dim`."""
        with safe_open(self._files[key], framework="pt") as file:
            if dim is None:
                return file.get_tensor(key)
            return file.get_slice(key)[_along(dim, start, stop)].contiguous()


class TensorDictSource:
    """Tensors of a dict loaded from a `torch.save` file (memory-mapped where the file allows)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> list[int]:
        return list(self._tensors[key].shape)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor.clone() if dim is None else tensor.narrow(dim, start, stop - start).clone()


def open_unsharded(path: str, model_key: str | None):
    """A source of the model's full tensors from a torch.save file, safetensors file or HF folder."""
    if os.path.isdir(path):
        return SafetensorsSource(_hf_folder_files(path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"no checkpoint file or folder at {path!r}; check the path.")
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as file:
            keys = list(file.keys())
        return SafetensorsSource(dict.fromkeys(keys, path))
    return TensorDictSource(_model_state(load_torch_file(path), model_key, path))


def _hf_folder_files(folder: str) -> dict[str, str]:
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index) as file:
            weight_map = json.load(file)["weight_map"]
        return {key: os.path.join(folder, name) for key, name in weight_map.items()}
    single = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.exists(single):
        with safe_open(single, framework="pt") as file:
            return dict.fromkeys(file.keys(), single)
    raise CheckpointNotFoundError(
        f"{folder!r} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}; pass the path of the "
        "checkpoint file itself (a torch.save or .safetensors file), or sharded=True for a checkpoint of parallel_layers.save."
    )


def load_torch_file(path: str):
    """`torch.load(path, weights_only=True)` on CPU, memory-mapped when the file's format allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refused to load {path!r}: it pickles objects other than tensors and plain containers, and unpickling "
            "them could run arbitrary code. If you trust the file, re-save its state dict with "
            f"torch.save(state_dict) or safetensors and load that. ({str(error).splitlines()[0]})"
        ) from error


def _model_state(loaded, model_key: str | None, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, dict):
        raise CheckpointKeyError(f"{path!r} holds a {type(loaded).__name__}, not a state dict; save model.state_dict().")
    if model_key is not None and model_key in loaded:
        state = loaded[model_key]
    elif all(isinstance(value, torch.Tensor) for value in loaded.values()):
        state = loaded
    else:
        raise CheckpointKeyError(
            f"model_key {model_key!r} is not in {path!r}, whose top-level keys are {sorted(map(str, loaded))[:20]}; "
            "pass the key that holds the model's state dict as model_key (or model_key=None for a bare state dict)."
        )
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointKeyError(f"the entry {model_key!r} of {path!r} is not a state dict of tensors.")
    return state

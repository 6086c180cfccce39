"""Unsharded checkpoints that users bring, read whole or one slice at a time.

A `torch.save` file (the state dict under `model_key`, or bare) is loaded with
`weights_only=True` and memory-mapped; a safetensors file or a Hugging Face model
folder (`model.safetensors`, or shards listed in `model.safetensors.index.json`)
is read through `safe_open(...).get_slice`, so a rank reads only its slice.
Only regular files are opened (a FIFO or device would hang the reader), the
files an index names must lie inside its folder, and a file that the readers
cannot parse raises CheckpointCorruptError.
"""

from __future__ import annotations

import json
import os
import pickle
import stat

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointCorruptError, CheckpointKeyError, CheckpointNotFoundError, UnsafeCheckpointError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _along(dim: int, start: int, stop: int) -> tuple:
    return (slice(None),) * dim + (slice(start, stop),)


def _regular_file(path: str) -> None:
    """Raise unless `path` is a regular file (checked before anything opens it)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path!r} does not exist; check the path (and that the download is complete).") from None
    if not stat.S_ISREG(mode):
        raise CheckpointCorruptError(f"{path!r} is not a regular file (a FIFO, socket or device); pass a checkpoint file.")


def _safetensors_error(path: str, error: Exception) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{path!r} is not a readable safetensors file ({error}); the file is damaged or not safetensors.")


class SafetensorsSource:
    """Tensors of one or more safetensors files; each read opens (maps) its file only for that read."""

    def __init__(self, files_by_key: dict[str, str]):
        self._files = files_by_key
        self._shapes = {}
        for path in sorted(set(files_by_key.values())):
            _regular_file(path)
            try:
                with safe_open(path, framework="pt") as file:
                    for key in file.keys():
                        self._shapes[key] = list(file.get_slice(key).get_shape())
            except SafetensorError as error:
                raise _safetensors_error(path, error) from None
        missing = sorted(set(files_by_key) - set(self._shapes))
        if missing:
            raise CheckpointNotFoundError(f"the index names tensors that its files do not hold: {missing[:10]}; the download is incomplete.")

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, key: str) -> list[int]:
        return self._shapes[key]

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor `key`, or its rows start:stop along `dim`."""
        try:
            with safe_open(self._files[key], framework="pt") as file:
                if dim is None:
                    return file.get_tensor(key)
                return file.get_slice(key)[_along(dim, start, stop)].contiguous()
        except SafetensorError as error:
            raise _safetensors_error(self._files[key], error) from None


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
    _regular_file(path)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as file:
                keys = list(file.keys())
        except SafetensorError as error:
            raise _safetensors_error(path, error) from None
        return SafetensorsSource(dict.fromkeys(keys, path))
    return TensorDictSource(_model_state(load_torch_file(path), model_key, path))


def _hf_folder_files(folder: str) -> dict[str, str]:
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.exists(index):
        return _index_files(folder, index)
    single = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.exists(single):
        _regular_file(single)
        try:
            with safe_open(single, framework="pt") as file:
                return dict.fromkeys(file.keys(), single)
        except SafetensorError as error:
            raise _safetensors_error(single, error) from None
    if os.path.exists(os.path.join(folder, "manifest.json")):
        raise CheckpointNotFoundError(
            f"{folder!r} is a sharded checkpoint of parallel_layers.save; load it with sharded=True (the default)."
        )
    raise CheckpointNotFoundError(
        f"{folder!r} has neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}; pass the path of the "
        "checkpoint file itself (a torch.save or .safetensors file), or sharded=True for a checkpoint of parallel_layers.save."
    )


def _index_files(folder: str, index: str) -> dict[str, str]:
    """key -> file path from a Hugging Face index, every file checked to lie inside `folder`."""
    _regular_file(index)
    try:
        with open(index, "rb") as file:
            weight_map = json.load(file)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) and name for name in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise CheckpointCorruptError(f"{index!r} is not a valid safetensors index ({error}); download it again.") from None
    root, files = os.path.realpath(folder), {}
    for key, name in weight_map.items():
        path = os.path.join(folder, name)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise CheckpointCorruptError(
                f"{index!r} names {name!r} for {key!r}, a file outside {folder!r}; an index may only name files in its folder."
            )
        files[key] = path
    return files


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
        raise _unsafe(path, error) from error
    except (RuntimeError, EOFError) as error:  # torch's reader on a truncated or foreign file
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointCorruptError(
            f"{path!r} is not a readable torch.save file ({first_line}); the file is damaged or in another format "
            "(pass a .safetensors file or a Hugging Face folder)."
        ) from error


def _unsafe(path: str, error: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"refused to load {path!r}: it pickles objects other than tensors and plain containers, and unpickling "
        "them could run arbitrary code. If you trust the file, re-save its state dict with "
        f"torch.save(state_dict) or safetensors and load that. ({str(error).splitlines()[0]})"
    )


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

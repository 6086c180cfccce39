"""A nested state (dicts, lists, tuples, scalars, tensors) as JSON plus a flat dict of tensors.

`flatten` replaces every tensor by a reference `{"__nxd__": "tensor", "name": ...}`
and tags what JSON cannot hold (tuples, dicts with non-string keys, non-finite
floats); `decode` rebuilds the tree, resolving each tensor name through a callback.
Nothing is pickled: any other type is refused with the path where it was found.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointCorruptError, UnsafeCheckpointError

TAG = "__nxd__"
_SCALARS = (bool, int, str, type(None))


@dataclass
class FlatState:
    """`structure` (JSON-ready) references `tensors` by name; `paths` says where each name came from."""

    structure: object
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    paths: dict[str, tuple] = field(default_factory=dict)


def flatten(state) -> FlatState:
    """Split `state` into a JSON-ready structure and its tensors, named by their key path.

    A tensor reachable twice (the same object, e.g. tied weights) is stored once.
    """
    flat = FlatState(structure=None)
    names_by_id: dict[int, str] = {}

    def name_for(path: tuple) -> str:
        base = "/".join(str(key) for key in path) or "tensor"
        name, suffix = base, 1
        while name in flat.tensors:
            suffix += 1
            name = f"{base}~{suffix}"
        return name

    def encode(value, path: tuple):
        if isinstance(value, torch.Tensor):
            name = names_by_id.get(id(value))
            if name is None:
                name = names_by_id[id(value)] = name_for(path)
                flat.tensors[name] = value
                flat.paths[name] = path
            return {TAG: "tensor", "name": name}
        if isinstance(value, float):
            return value if math.isfinite(value) else {TAG: "float", "value": repr(value)}
        if isinstance(value, _SCALARS):
            return value
        if isinstance(value, dict):
            if all(isinstance(key, str) for key in value) and TAG not in value:
                return {key: encode(item, (*path, key)) for key, item in value.items()}
            return {TAG: "dict", "items": [[encode(key, (*path, "key")), encode(item, (*path, key))] for key, item in value.items()]}
        if isinstance(value, list):
            return [encode(item, (*path, index)) for index, item in enumerate(value)]
        if isinstance(value, tuple):
            return {TAG: "tuple", "items": [encode(item, (*path, index)) for index, item in enumerate(value)]}
        where = "/".join(str(key) for key in path) or "the state dict itself"
        raise UnsafeCheckpointError(
            f"cannot save {type(value).__module__}.{type(value).__qualname__} at '{where}': checkpoints hold "
            "tensors, dicts, lists, tuples, str, int, float, bool and None (no pickle); convert it to one of those."
        )

    flat.structure = encode(state, ())
    return flat


class TensorRef:
    """A tensor of a decoded structure, not yet read: `decode(structure, TensorRef)`."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r})"


def _malformed(structure) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"malformed entry {str(structure)[:200]} in a checkpoint structure; the shard file is damaged: restore the "
        "checkpoint folder from a copy."
    )


def _items(structure: dict, pairs: bool = False) -> list:
    items = structure.get("items")
    if not isinstance(items, list) or (pairs and not all(isinstance(item, list) and len(item) == 2 for item in items)):
        raise _malformed(structure)
    return items


def decode(structure, resolve: Callable[[str], object]):
    """Rebuild the tree from `structure`, replacing each tensor reference by `resolve(name)`.

    A malformed tagged entry raises CheckpointCorruptError; an unknown tag, UnsafeCheckpointError.
    """
    if isinstance(structure, list):
        return [decode(item, resolve) for item in structure]
    if not isinstance(structure, dict):
        return structure
    tag = structure.get(TAG)
    if tag is None:
        return {key: decode(item, resolve) for key, item in structure.items()}
    if tag == "tensor":
        return resolve(_tensor_name(structure))
    if tag == "float":
        value = structure.get("value")
        if value not in ("inf", "-inf", "nan"):
            raise _malformed(structure)
        return float(value)
    if tag == "tuple":
        return tuple(decode(item, resolve) for item in _items(structure))
    if tag == "dict":
        decoded = {}
        for key, item in _items(structure, pairs=True):
            key = decode(key, resolve)
            try:
                hash(key)
            except TypeError:  # a list or dict where a key should be
                raise _malformed(structure) from None
            decoded[key] = decode(item, resolve)
        return decoded
    raise UnsafeCheckpointError(f"unknown entry {TAG}={str(tag)[:80]!r} in a checkpoint structure; was it written by a newer version?")


def _tensor_name(structure: dict) -> str:
    name = structure.get("name")
    if not isinstance(name, str):
        raise _malformed(structure)
    return name


def tensor_names(structure) -> Iterator[str]:
    """Every tensor name referenced in `structure`, in order."""
    if isinstance(structure, list):
        for item in structure:
            yield from tensor_names(item)
    elif isinstance(structure, dict):
        if structure.get(TAG) == "tensor":
            yield _tensor_name(structure)
        else:
            for item in structure.values():
                yield from tensor_names(item)


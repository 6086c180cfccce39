"""What a traced model takes and returns, as plain data that JSON can hold.

`InputSignature` is the positional and keyword tensors of the traced call;
`OutputLayout` is the flat list of output tensors plus the structure (tuples,
lists, dicts, None and scalars) that rebuilds what the model returned. Neither
refers to the model's Python classes, so a traced model loads without them:
dict-like outputs (a Hugging Face ModelOutput) come back as plain dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import TracedInputError, TraceFunctionError


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one input or output tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        dtype = getattr(torch, data["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {data['dtype']!r}")
        return cls(tuple(int(size) for size in data["shape"]), dtype)


@dataclass(frozen=True)
class InputSignature:
    """The tensors of the traced call: positional ones, then keyword ones in `keyword_names` order."""

    positional: tuple[TensorSpec, ...]
    keyword_names: tuple[str, ...]
    keyword: tuple[TensorSpec, ...]

    @classmethod
    def of_example(cls, inputs) -> tuple[InputSignature, tuple, dict]:
        """Signature, args and kwargs from the seed's `inputs`: a tensor, a tuple/list of tensors, or a dict."""
        if isinstance(inputs, torch.Tensor):
            args, kwargs = (inputs,), {}
        elif isinstance(inputs, (tuple, list)):
            args, kwargs = tuple(inputs), {}
        elif isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        else:
            raise TraceFunctionError(
                f"inputs must be a tensor, a tuple or list of tensors (positional) or a dict of tensors "
                f"(keyword), got {type(inputs).__name__}."
            )
        for where, value in [*((f"inputs[{i}]", a) for i, a in enumerate(args)), *kwargs.items()]:
            if not isinstance(value, torch.Tensor):
                raise TraceFunctionError(
                    f"{where} is a {type(value).__name__}; every traced input must be a tensor "
                    "(bake other arguments into the model that func returns)."
                )
        signature = cls(
            tuple(TensorSpec.of(a) for a in args), tuple(kwargs), tuple(TensorSpec.of(v) for v in kwargs.values())
        )
        return signature, args, kwargs

    @property
    def specs(self) -> list[TensorSpec]:
        """Every input tensor's spec, positional first."""
        return [*self.positional, *self.keyword]

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The call's tensors in `specs` order, after checking them against the traced ones."""
        if len(args) != len(self.positional) or set(kwargs) != set(self.keyword_names):
            raise TracedInputError(
                f"the model was traced with {len(self.positional)} positional input(s) and keyword inputs "
                f"{list(self.keyword_names)}; got {len(args)} positional and {sorted(kwargs)}. "
                "Call it with the same inputs as the trace."
            )
        tensors = [*args, *(kwargs[name] for name in self.keyword_names)] if kwargs else list(args)
        for index, (tensor, spec) in enumerate(zip(tensors, self.specs)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != spec.dtype or tensor.shape != spec.shape:
                name = f"input {index}" if index < len(args) else f"input {self.keyword_names[index - len(args)]!r}"
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise TracedInputError(
                    f"{name} was traced as {spec.shape} {spec.dtype}, got {got}; a traced model takes the "
                    "shapes and dtypes it was traced with (pad the input, or trace again with this shape)."
                )
        return tensors

    def to_json(self) -> dict:
        return {
            "positional": [spec.to_json() for spec in self.positional],
            "keyword": {name: spec.to_json() for name, spec in zip(self.keyword_names, self.keyword)},
        }

    @classmethod
    def from_json(cls, data: dict) -> InputSignature:
        keyword = data["keyword"]
        return cls(
            tuple(TensorSpec.from_json(spec) for spec in data["positional"]),
            tuple(keyword),
            tuple(TensorSpec.from_json(spec) for spec in keyword.values()),
        )


_SCALARS = (bool, int, float, str)


def flatten_outputs(value) -> tuple[list[torch.Tensor], object]:
    """The tensors in `value`, in order, and a JSON structure that `rebuild_outputs` fills with them."""
    tensors: list[torch.Tensor] = []

    def encode(node):
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return {"tensor": len(tensors) - 1}
        if node is None or isinstance(node, _SCALARS):
            return {"value": node}
        if isinstance(node, Mapping):
            return {"dict": [[str(key), encode(item)] for key, item in node.items()]}
        if isinstance(node, (tuple, list)):
            return {"list" if isinstance(node, list) else "tuple": [encode(item) for item in node]}
        raise TraceFunctionError(
            f"the model returned a {type(node).__name__}; traced models return tensors in tuples, lists "
            "and dicts (and None or numbers). Convert the output in the model's forward."
        )

    return tensors, encode(value)


def rebuild_outputs(structure, tensors: list[torch.Tensor]):
    """Inverse of `flatten_outputs`, with plain tuples, lists and dicts."""
    if "tensor" in structure:
        return tensors[structure["tensor"]]
    if "value" in structure:
        return structure["value"]
    if "dict" in structure:
        return {key: rebuild_outputs(item, tensors) for key, item in structure["dict"]}
    if "list" in structure:
        return [rebuild_outputs(item, tensors) for item in structure["list"]]
    return tuple(rebuild_outputs(item, tensors) for item in structure["tuple"])


@dataclass(frozen=True)
class OutputLayout:
    """The output tensors' specs and the structure that holds them."""

    specs: tuple[TensorSpec, ...]
    structure: object

    def to_json(self) -> dict:
        return {"tensors": [spec.to_json() for spec in self.specs], "structure": self.structure}

    @classmethod
    def from_json(cls, data: dict) -> OutputLayout:
        return cls(tuple(TensorSpec.from_json(spec) for spec in data["tensors"]), data["structure"])

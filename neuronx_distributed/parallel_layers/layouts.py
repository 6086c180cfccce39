"""How each parameter of a model maps onto its full tensor, as the layers declare it.

A parallel layer records, per parameter name, a `Layout` when it registers the
parameter (`DeclaresLayouts`): the partition dim, the stride of a fused weight or
the parts (`resharding.Part`: Q/K/V sizes, replicated KV heads) of its full
tensor, or that the parameter is replicated. The record belongs to the module, so
it survives what replaces tensors: `.to()`, `state_dict()`, a copy or a cast of
the state dict. `model_layouts(model)` gives them by state-dict key (a tied
parameter under each of its keys), which is what `parallel_layers.save(...,
model=model)` reads.

The tensor attributes (`tensor_model_parallel`, `partition_dim`, `partition_stride`,
`partition_parts`) stay as the documented compatibility view: a parameter that no
layer declares (a user's own, marked with `set_tensor_model_parallel_attributes`)
is described by them. They hold plain ints, bools and tuples of ints only (the
`Part` objects live in the module's `Layout`), so `torch.save(model.state_dict())`
loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .resharding import Part, partition_parts


@dataclass(frozen=True)
class Layout:
    """A parameter's layout across the TP ranks: sharded along `partition_dim` (None: replicated).

    A sharded partition dim is `stride` equal parts (a fused weight), or, when `parts`
    is set, those parts (sizes in the stored full tensor, see `resharding.Part`).
    """

    partition_dim: int | None
    stride: int = 1
    parts: tuple[Part, ...] | None = None

    @property
    def sharded(self) -> bool:
        return self.partition_dim is not None

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Layout | None:
        """The layout a tensor's compatibility attributes describe; None where it carries none."""
        if not hasattr(tensor, "tensor_model_parallel"):
            return None
        if not tensor.tensor_model_parallel:
            return cls(None)
        return cls(tensor.partition_dim, tensor.partition_stride, partition_parts(tensor))


class DeclaresLayouts:
    """Mixin of the parallel layers: `parameter_layouts()` is what the layer declared for each parameter.

    A parameter registered with tensor-parallel attributes (the layers build every
    parameter that way) has its layout recorded under its name; registering another
    parameter (or None) under that name replaces (or drops) the record.
    """

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        layouts = self.__dict__.setdefault("_parameter_layouts", {})
        layout = None if param is None else Layout.of(param)
        if layout is None:
            layouts.pop(name, None)
        else:
            layouts[name] = layout

    def parameter_layouts(self) -> dict[str, Layout]:
        """Parameter name (of this module, not its children) -> its declared layout."""
        return dict(self.__dict__.get("_parameter_layouts", {}))


def model_layouts(model: nn.Module) -> dict[str, Layout]:
    """State-dict key -> layout of every parameter that a layer declares or whose attributes describe one.

    A tied parameter appears under each of its keys, with the layout of the layer
    that declares it, whichever module the key goes through.
    """
    declared: dict[int, Layout] = {}
    for module in model.modules():
        if isinstance(module, DeclaresLayouts):
            for name, layout in module.parameter_layouts().items():
                param = module._parameters.get(name)
                if param is not None:
                    declared[id(param)] = layout
    layouts = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        layout = declared.get(id(tensor)) or Layout.of(tensor)
        if layout is not None:
            layouts[key] = layout
    return layouts

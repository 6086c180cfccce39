"""Per-parameter loaders: how a full (unsharded) checkpoint tensor becomes this rank's shard.

Most sharded parameters are a plain split of one full tensor along `partition_dim`
(with `partition_stride`), and `parallel_layers.load(..., sharded=False)` cuts them
from those attributes. A layer whose shard is anything else (KV heads replicated
across ranks, padded heads) declares it by attaching a loader to the parameter, in
the way vLLM's per-parameter `weight_loader` works:

    set_weight_loader(param, loader)

`loader(full_shape, read)` gets the full tensor's shape and a reader, where
`read(dim, start, stop)` returns the full tensor's rows `start:stop` along `dim`
(or the whole tensor when `dim` is None), and returns this rank's shard with the
parameter's shape. It raises CheckpointShapeError when `full_shape` does not fit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FullTensorReader = Callable[[int | None, int, int], torch.Tensor]
WeightLoader = Callable[[list[int], FullTensorReader], torch.Tensor]

_ATTRIBUTE = "weight_loader"


def set_weight_loader(param: torch.Tensor, loader: WeightLoader) -> None:
    """Declare how a full checkpoint tensor loads into `param`'s shard."""
    setattr(param, _ATTRIBUTE, loader)


def get_weight_loader(param: torch.Tensor) -> WeightLoader | None:
    """The loader declared for `param`, or None when its shard is cut by its partition attributes."""
    return getattr(param, _ATTRIBUTE, None)

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

A fused parameter whose full tensor checkpoints often hold as several tensors (a fused
QKV weight stored as separate Q, K and V weights) names them, relative to its module:

    set_checkpoint_parts(param, ["weight_q", "weight_k", "weight_v"])

and a checkpoint without the parameter's own key but with all of those gives the
parameter their concatenation along dim 0 as its full tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FullTensorReader = Callable[[int | None, int, int], torch.Tensor]
WeightLoader = Callable[[list[int], FullTensorReader], torch.Tensor]

_ATTRIBUTE = "weight_loader"
_PARTS_ATTRIBUTE = "checkpoint_parts"


def set_weight_loader(param: torch.Tensor, loader: WeightLoader) -> None:
    """Declare how a full checkpoint tensor loads into `param`'s shard."""
    setattr(param, _ATTRIBUTE, loader)


def get_weight_loader(param: torch.Tensor) -> WeightLoader | None:
    """The loader declared for `param`, or None when its shard is cut by its partition attributes."""
    return getattr(param, _ATTRIBUTE, None)


def set_checkpoint_parts(param: torch.Tensor, names: list[str]) -> None:
    """Declare that a checkpoint may hold `param`'s full tensor as `names` (keys beside it), concatenated along dim 0."""
    setattr(param, _PARTS_ATTRIBUTE, tuple(names))


def get_checkpoint_parts(param: torch.Tensor) -> tuple[str, ...] | None:
    """The keys `param`'s full tensor may be stored as, or None."""
    return getattr(param, _PARTS_ATTRIBUTE, None)

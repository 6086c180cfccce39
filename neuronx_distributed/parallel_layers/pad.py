"""Attention-head padding: tensor parallelism for head counts that the TP degree does not divide.

A model with 14 heads cannot put whole heads on 4 ranks. `pad_model` adds zero heads
(here 2, `get_number_of_extra_heads(14, 4)`) after the real ones, so each rank holds 4
heads and the last rank's last 2 are padding. Padded heads change nothing: their
query/key/value rows are zero, the output layer (a padded RowParallelLinear) never
multiplies their features, and their parameters get zero gradients, so they stay zero
through optimizer steps (SGD, Adam, AdamW and its weight decay leave a zero parameter
with a zero gradient at zero). Outputs, input gradients and the real part of every
gradient equal the unpadded model's.

Typical use, as upstream's (the attention module computes its per-rank head count
from the padded count):

    model = build_model()  # parallel layers built at TP = tp_degree
    model = pad_model(model, tp_degree, config.num_attention_heads, wrapped_classes=(MyAttention,),
                      pad_hook_fn=lambda module, ratio: ...)  # e.g. set module.num_heads per rank

Checkpoints of a padded model: `parallel_layers.save` writes the padded shards, so the
manifest's global shapes are the padded ones and `nxd checkpoint merge` gives the padded
full tensors (the real heads first, then zeros: slice them off to get the unpadded
tensor). Such a sharded checkpoint loads into a model padded to the same size. A full,
unpadded checkpoint (a Hugging Face folder, a torch.save file) loads into the padded
model with `parallel_layers.load(..., sharded=False)`: each padded parameter's weight
loader pads it. A padded full tensor is refused there (its padding could be a real
feature of another model); slice the padding off first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LayerConfigError, LayerFeatureNotSupportedError
from .layers import ColumnParallelLinear, RowParallelLinear

_KV_LAYOUTS = ("trn1", "trn2")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LayerConfigError(f"{name} must be a positive integer, got {value!r}.")
    return value


def get_number_of_extra_heads(n_head: int, tp_degree: int) -> int:
    """How many zero heads make `n_head` a multiple of `tp_degree`."""
    _positive_int("n_head", n_head)
    return -n_head % _positive_int("tp_degree", tp_degree)


def _sharded_size(layer) -> tuple[int, int]:
    """(unpadded, current padded) size of the dimension a parallel linear layer shards."""
    if isinstance(layer, ColumnParallelLinear):
        return layer.output_size - layer.pad_size, layer.output_size
    return layer.input_size - layer.pad_size, layer.input_size


def _in_scope(model: nn.Module, wrapped_classes: tuple) -> list[nn.Module]:
    """The modules to pad, children before parents: all of `model`, or the `wrapped_classes` and their submodules."""
    found = []

    def visit(module: nn.Module, inside: bool) -> None:
        inside = inside or isinstance(module, wrapped_classes)
        for child in module.children():
            visit(child, inside)
        if inside:
            found.append(module)

    visit(model, not wrapped_classes)
    return found


def _padded_sizes(modules, tp_degree: int, n_heads: int, n_heads_padded: int) -> dict[nn.Module, int]:
    """The new padded size of each parallel linear layer that needs one; raises before anything changes."""
    sizes = {}
    for module in modules:
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        name = type(module).__name__
        world = dist.get_world_size(module.tensor_parallel_group)
        if world != tp_degree:
            raise LayerConfigError(
                f"pad_model(tp_degree={tp_degree}) found a {name} built at tensor parallel size {world}; "
                "pass the TP size the model was built with."
            )
        unpadded, current = _sharded_size(module)
        if unpadded % n_heads:
            raise LayerConfigError(
                f"pad_model(n_heads={n_heads}) found a {name} whose sharded size {unpadded} is not a whole number "
                "of heads; pass wrapped_classes=(YourAttention,) so that only the attention layers are padded."
            )
        padded = unpadded // n_heads * n_heads_padded
        if padded == current:
            continue
        if module.stride > 1:
            raise LayerFeatureNotSupportedError(
                f"pad_model cannot pad a {name} with stride={module.stride} (a fused weight); "
                "use separate query, key and value layers."
            )
        sizes[module] = padded
    return sizes


def pad_model(
    model: nn.Module,
    tp_degree: int,
    n_heads: int,
    wrapped_classes=(),
    pad_hook_fn: Callable[[nn.Module, float], None] | None = None,
) -> nn.Module:
    """Pad the attention heads of `model`'s parallel linear layers to a multiple of `tp_degree`; return `model`.

    Every ColumnParallelLinear (its output features) and RowParallelLinear (its input
    features) inside `wrapped_classes` (all of `model` when empty) is re-sharded as
    `n_heads + get_number_of_extra_heads(n_heads, tp_degree)` heads of the same size, the
    extra ones zero and last. Then `pad_hook_fn(module, n_heads_padded / n_heads)` is called
    for each module in scope, children first (as upstream), to fix what counts heads.

    Every rank of the TP group calls it (the shards are all-gathered once, at this call).
    The layers get new parameters: build the optimizer afterwards. All checks run before
    anything changes. Upstream pads each rank's shard where it lies; here the padding goes
    after the real heads (on the last ranks), which keeps the same-seed contract: the
    unpadded part of each full weight equals the unpadded layer's weight.
    """
    _positive_int("tp_degree", tp_degree)
    _positive_int("n_heads", n_heads)
    if not isinstance(model, nn.Module):
        raise LayerConfigError(f"pad_model takes a torch.nn.Module, got {type(model).__name__}.")
    wrapped_classes = tuple(wrapped_classes)
    if not all(isinstance(cls, type) for cls in wrapped_classes):
        raise LayerConfigError(f"wrapped_classes must be classes, got {wrapped_classes!r}.")
    if pad_hook_fn is not None and not callable(pad_hook_fn):
        raise LayerConfigError(f"pad_hook_fn must be callable or None, got {pad_hook_fn!r}.")
    n_heads_padded = n_heads + get_number_of_extra_heads(n_heads, tp_degree)
    modules = _in_scope(model, wrapped_classes)
    for module, padded in _padded_sizes(modules, tp_degree, n_heads, n_heads_padded).items():
        module._repad(padded)
    if pad_hook_fn is not None:
        for module in modules:
            pad_hook_fn(module, n_heads_padded / n_heads)
    return model


def _layout_name(hardware_type) -> str:
    name = str(getattr(hardware_type, "value", hardware_type)).lower()
    if name not in _KV_LAYOUTS:
        raise LayerConfigError(
            f"Unexpected hardware_type {hardware_type!r}: pass 'trn1' (replicated KV heads repeat as a group) "
            "or 'trn2' (the replicas of a KV head on adjacent ranks)."
        )
    return name


def generate_padding_mask(
    num_heads: int,
    num_heads_with_pad: int,
    num_kv_heads: int,
    tp_degree: int,
    tp_rank: int,
    hardware_type="trn1",
) -> torch.Tensor:
    """Which of rank `tp_rank`'s query heads are real: a bool tensor of `num_heads_with_pad // tp_degree`.

    With `num_kv_heads == num_heads` (multi-head attention) the padded heads are the last
    ones, as `pad_model` lays them out. With grouped-query attention each KV head's query
    heads are padded within the group, the padding on the group's last slots, and the
    groups are spread as upstream replicates KV heads across more ranks than there are KV
    heads: `hardware_type` 'trn1' repeats the set of KV heads (rank r holds KV head
    r % num_kv_heads), 'trn2' puts a KV head's replicas on adjacent ranks. (Upstream
    picks the layout by the Neuron chip; here it is only a layout name.)
    """
    for name, value in (("num_heads", num_heads), ("num_heads_with_pad", num_heads_with_pad),
                        ("num_kv_heads", num_kv_heads), ("tp_degree", tp_degree)):
        _positive_int(name, value)
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_degree:
        raise LayerConfigError(f"tp_rank must be an int in [0, {tp_degree}), got {tp_rank!r}.")
    layout = _layout_name(hardware_type)
    if num_heads_with_pad < num_heads or num_heads_with_pad % tp_degree:
        raise LayerConfigError(
            f"num_heads_with_pad ({num_heads_with_pad}) must be at least num_heads ({num_heads}) and a multiple "
            f"of tp_degree ({tp_degree}); use num_heads + get_number_of_extra_heads(num_heads, tp_degree)."
        )
    per_rank = num_heads_with_pad // tp_degree
    slots = torch.arange(per_rank)
    if num_kv_heads == num_heads:
        return slots + tp_rank * per_rank < num_heads
    if num_heads % num_kv_heads or num_heads_with_pad % num_kv_heads:
        raise LayerConfigError(
            f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}) and num_heads_with_pad "
            f"({num_heads_with_pad}) for grouped-query attention."
        )
    if (tp_degree % num_kv_heads) if num_kv_heads < tp_degree else (num_kv_heads % tp_degree):
        raise LayerConfigError(
            f"num_kv_heads ({num_kv_heads}) and tp_degree ({tp_degree}) must divide one another."
        )
    replicas = max(tp_degree // num_kv_heads, 1)
    replica = tp_rank // num_kv_heads if layout == "trn1" else tp_rank % replicas  # 0 without replication
    group_padded, group_real = num_heads_with_pad // num_kv_heads, num_heads // num_kv_heads
    return (slots + replica * per_rank) % group_padded < group_real

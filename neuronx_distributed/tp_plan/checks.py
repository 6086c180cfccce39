"""Checking a plan against the model before anything changes: types, sizes, heads, tied parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ParallelizePlanError
from .conv1d import conv1d_type
from .plans import Style

# Attributes of an attention module that count its heads (or their features) and become per-rank values.
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "all_head_size", "split_size")


@dataclass
class Swap:
    """One planned module: its style and what its parameters become (`layouts`: name -> (dim, stride) or None).

    `sequence_parallel`: the layer gathers (column) or reduce-scatters (row) the sequence.
    """

    name: str
    entry: str
    style_name: str
    style: Style
    module: nn.Module
    layouts: dict = field(default_factory=dict)
    kv_multiplier: int = 1
    head_dim: int = 0
    sequence_parallel: bool = False


def _fail(swap: Swap, what: str) -> ParallelizePlanError:
    return ParallelizePlanError(f"module {swap.name!r} (plan entry {swap.entry!r}: {swap.style_name!r}): {what}")


def parameter_layouts(swap: Swap, world: int) -> dict:
    """Parameter name -> (partition dim, stride) for sharded, None for replicated; checks type and sizes."""
    style, module = swap.style, swap.module
    conv1d = conv1d_type()
    if style.kind == "embedding":
        if type(module) is not nn.Embedding:
            raise _fail(swap, f"embedding styles shard torch.nn.Embedding, got {type(module).__name__}.")
        dim = 1 if style.shard_across_embedding else 0
        _check_divides(swap, module.weight.shape[dim], world, "embedding_dim" if dim else "num_embeddings")
        return {"weight": (dim, 1)}
    is_conv1d = conv1d is not None and type(module) is conv1d
    if type(module) is not nn.Linear and not is_conv1d:
        raise _fail(swap, f"{style.kind} styles shard torch.nn.Linear or transformers' Conv1D, got {type(module).__name__}.")
    out_dim, in_dim = (1, 0) if is_conv1d else (0, 1)
    if style.kind == "column":
        _check_divides(swap, module.weight.shape[out_dim], world * style.blocks, "output features")
        bias = None if style.gather_output else (0, style.blocks)
        return {"weight": (out_dim, style.blocks), "bias": bias}
    _check_divides(swap, module.weight.shape[in_dim], world, "input features")
    return {"weight": (in_dim, 1), "bias": None}


def _check_divides(swap: Swap, size: int, parts: int, what: str) -> None:
    if size % parts:
        raise _fail(swap, f"its {what} ({size}) do not split into {parts} equal parts; choose another tensor parallel size.")


def _head_dim(module: nn.Module) -> int | None:
    value = getattr(module, "head_dim", getattr(module, "attention_head_size", None))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def attention_updates(swaps: dict[str, Swap], model: nn.Module, world: int) -> dict[str, dict]:
    """Attention module name -> its head-count attributes' per-rank values; sets each KV projection's multiplier.

    Only projections whose sharded side stays local (column without gather, row on a parallel input)
    put the attention module's forward on local heads.
    """
    by_parent: dict[str, list[Swap]] = {}
    for swap in swaps.values():
        style = swap.style
        if (style.kind == "column" and not style.gather_output) or (style.kind == "row" and style.input_is_parallel):
            by_parent.setdefault(swap.name.rpartition(".")[0], []).append(swap)
    updates = {}
    for parent_name, children in by_parent.items():
        parent = model.get_submodule(parent_name)
        head_dim = _head_dim(parent)
        if head_dim is None:
            continue
        heads = {}
        for swap in children:
            features = swap.module.weight.shape[swap.layouts["weight"][0]] // swap.style.blocks
            if features % head_dim:
                raise _fail(swap, f"its {features} features are not whole heads of {head_dim}.")
            heads[swap.name] = features // head_dim
        query_heads = max(heads.values())
        multiplier = 1
        for swap in children:
            swap.head_dim, count = head_dim, heads[swap.name]
            if count % world == 0:
                continue
            replicable = count < query_heads and world % count == 0 and query_heads % world == 0
            if swap.style.kind == "column" and swap.style.blocks == 1 and isinstance(swap.module, nn.Linear) and replicable:
                swap.kv_multiplier = multiplier = world // count
                continue
            raise _fail(swap, f"its {count} heads do not split across {world} ranks (and are not key/value heads "
                              "that replication can spread); choose a tensor parallel size that divides the head count.")
        values = {}
        for attribute in _HEAD_COUNTS:
            value = getattr(parent, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool):
                if value % world:
                    raise ParallelizePlanError(
                        f"attention module {parent_name!r}: {attribute}={value} does not split across {world} ranks; "
                        "choose a tensor parallel size that divides it."
                    )
                values[attribute] = value // world
        kv_heads = getattr(parent, "num_key_value_heads", None)
        if isinstance(kv_heads, int):
            values["num_key_value_heads"] = kv_heads * multiplier // world
        groups = getattr(parent, "num_key_value_groups", None)
        if isinstance(groups, int) and multiplier > 1:
            values["num_key_value_groups"] = groups // multiplier
        updates[parent_name] = values
    return updates


def check_ties(model: nn.Module, swaps: dict[str, Swap]) -> None:
    """A parameter shared by several modules (tied embeddings) must be sharded alike wherever it is used.

    A use outside the plan (or under `replicate`) keeps the whole tensor, as does a replicated parameter.
    """
    uses: dict[int, list[tuple[str, tuple | None]]] = {}
    for full_name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, param_name = full_name.rpartition(".")
        swap = swaps.get(module_name)
        layout = swap.layouts.get(param_name) if swap is not None else None
        uses.setdefault(id(param), []).append((full_name, layout))
    for entries in uses.values():
        if len({layout for _, layout in entries}) > 1:
            raise ParallelizePlanError(
                f"the tied parameters {[name for name, _ in entries]} would be sharded differently "
                f"(dim, stride: {[layout for _, layout in entries]}, None: whole); give their modules styles that "
                "shard them alike (e.g. embedding_rowwise with colwise_gather_output), or untie them."
            )

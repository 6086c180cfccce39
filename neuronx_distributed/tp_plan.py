"""`parallelize(model, plan=None)`: an unmodified Hugging Face model made tensor-parallel from its tp_plan.

A plan maps module-name patterns to styles, as transformers 5 writes them
(`model.tp_plan`, built from the model class's `_tp_plan` and
`config.base_model_tp_plan`): `*` stands for one dotted component (a layer
index). `parallelize` replaces each planned module by our layer under the same
name, so state-dict keys and shapes stay the Hugging Face ones:

    colwise                 ColumnParallelLinear(gather_output=False)
    colwise_gather_output   ColumnParallelLinear(gather_output=True) (also `colwise_rep`)
    packed_colwise          column-parallel over 2 packed blocks ([gate; up]), each rank keeping its part of each
    qkv_colwise             column-parallel over 3 packed blocks ([q; k; v], GPT-2's c_attn; our addition)
    rowwise                 RowParallelLinear(input_is_parallel=True)
    rowwise_split_input     RowParallelLinear(input_is_parallel=False) (also `rowwise_rep`)
    embedding_rowwise       ParallelEmbedding sharding the vocabulary
    embedding_colwise       ParallelEmbedding(shard_across_embedding=True)
    replicate               left as it is

transformers' GPT-2 `Conv1D` (weight stored `[in, out]`) becomes a parallel layer
that keeps that layout. GPT-2 and BERT carry no plan in transformers 5; their
plans are `FALLBACK_PLANS` here.

The attention modules whose projections are sharded get local head counts
(`num_heads`, `num_attention_heads`, `num_key_value_heads`, `num_key_value_groups`,
`all_head_size`, `split_size`, the attributes their forward reads), so the
unmodified forward runs on this rank's heads. Where the TP degree exceeds the
key/value head count (grouped-query attention), each KV head is replicated
`tp // num_kv_heads` times (`modules.qkv_linear.ReplicatedKVColumnParallelLinear`).

The weights the model holds are sharded (each shard the exact slice of the
full weight, so `from_pretrained` then `parallelize` gives the pretrained model
in parallel); a model built on the meta device is materialized on `device` with
empty weights for `parallel_layers.load(hf_folder, model, sharded=False)` to fill
(its non-persistent buffers, such as rotary frequencies, are recomputed by the
model's own `_init_weights`). The whole plan is checked before anything is
replaced: a model without a plan, an unknown style, or a module a style cannot
shard raises ParallelizePlanError naming it, on every rank, and leaves the model
as it was.

The vocabulary-parallel `lm_head` (`colwise_gather_output`) gathers the logits, as
Hugging Face's loss needs. To keep them sharded for
`parallel_layers.loss_functions.parallel_cross_entropy`, override the entry:
`parallelize(model, {**model.tp_plan, "lm_head": "colwise"})` and compute the
loss from the `[..., vocab / tp]` logits yourself (pass no `labels`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ParallelizePlanError
from .parallel_layers import parallel_state
from .parallel_layers.initialization import shard_of
from .parallel_layers.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .parallel_layers.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .parallel_layers.utils import PARAMETER_ATTRIBUTES, set_tensor_model_parallel_attributes
from .parallel_layers.weight_loading import get_weight_loader, set_weight_loader

# Plans for the families transformers 5 ships without one: entries relative to the base model
# ("base") and to the model with its head ("head", e.g. GPT2LMHeadModel's lm_head).
FALLBACK_PLANS = {
    "gpt2": {
        "base": {
            "wte": "embedding_rowwise",
            "h.*.attn.c_attn": "qkv_colwise",
            "h.*.attn.c_proj": "rowwise",
            "h.*.mlp.c_fc": "colwise",
            "h.*.mlp.c_proj": "rowwise",
        },
        "head": {"lm_head": "colwise_gather_output"},
    },
    "bert": {
        "base": {
            "embeddings.word_embeddings": "embedding_rowwise",
            "encoder.layer.*.attention.self.query": "colwise",
            "encoder.layer.*.attention.self.key": "colwise",
            "encoder.layer.*.attention.self.value": "colwise",
            "encoder.layer.*.attention.output.dense": "rowwise",
            "encoder.layer.*.intermediate.dense": "colwise",
            "encoder.layer.*.output.dense": "rowwise",
        },
        "head": {"cls.predictions.decoder": "colwise_gather_output"},
    },
}

# Attributes of an attention module that count its heads (or their features) and become per-rank values.
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "all_head_size", "split_size")


@dataclass(frozen=True)
class _Style:
    """How one plan style shards a module: `kind` is column, row, embedding or replicate."""

    kind: str
    gather_output: bool = False
    input_is_parallel: bool = True
    blocks: int = 1
    shard_across_embedding: bool = False


STYLES = {
    "colwise": _Style("column"),
    "colwise_gather_output": _Style("column", gather_output=True),
    "colwise_rep": _Style("column", gather_output=True),
    "packed_colwise": _Style("column", blocks=2),
    "qkv_colwise": _Style("column", blocks=3),
    "rowwise": _Style("row"),
    "rowwise_split_input": _Style("row", input_is_parallel=False),
    "rowwise_rep": _Style("row", input_is_parallel=False),
    "embedding_rowwise": _Style("embedding"),
    "embedding_colwise": _Style("embedding", shard_across_embedding=True),
    "replicate": _Style("replicate"),
}


def _conv1d_type():
    """transformers' Conv1D class, or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


class ColumnParallelConv1D(ColumnParallelLinear):
    """transformers' Conv1D (y = x W + b, W stored `[in, out]`) with W's output columns split across the TP group.

    Keeps Conv1D's layout, so the weight is sharded along dim 1 and its state-dict
    shape is the Hugging Face one. Built by `parallelize` from a Conv1D.
    """

    def __init__(self, conv, gather_output: bool, blocks: int, group):
        super().__init__(conv.nx, conv.nf, bias=True, gather_output=gather_output, dtype=conv.weight.dtype,
                         device="meta", stride=blocks, tensor_model_parallel_group=group)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        group = self.tensor_parallel_group
        output = torch.matmul(copy_to_tensor_model_parallel_region(input_, group), self.weight)
        if not self.gather_output:
            return output + self.bias
        return self._in_unsharded_order(gather_from_tensor_model_parallel_region(output, group)) + self.bias


class RowParallelConv1D(RowParallelLinear):
    """transformers' Conv1D with W's input rows (dim 0 of its `[in, out]` weight) split across the TP group."""

    def __init__(self, conv, input_is_parallel: bool, group):
        super().__init__(conv.nx, conv.nf, bias=True, input_is_parallel=input_is_parallel, dtype=conv.weight.dtype,
                         device="meta", tensor_model_parallel_group=group)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        group = self.tensor_parallel_group
        if not self.input_is_parallel:
            input_ = scatter_to_tensor_model_parallel_region(input_, group)
        return reduce_from_tensor_model_parallel_region(torch.matmul(input_, self.weight), group) + self.bias


# ---------------------------------------------------------------- the plan


def model_plan(model: nn.Module) -> dict[str, str]:
    """The plan `parallelize(model)` applies: the model's own tp_plan, else its family's FALLBACK_PLANS entry."""
    plan = dict(getattr(model, "_tp_plan", None) or {})
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", model)
    prefix = "" if base is model else f"{getattr(model, 'base_model_prefix', '')}."
    if not plan and getattr(config, "base_model_tp_plan", None):
        plan = {prefix + key: style for key, style in config.base_model_tp_plan.items()}
    fallback = FALLBACK_PLANS.get(getattr(config, "model_type", None))
    if not plan and fallback is not None:
        plan = {prefix + key: style for key, style in fallback["base"].items()}
        if base is not model:
            plan.update(fallback["head"])
    return plan


def _pattern(entry: str) -> re.Pattern:
    return re.compile(re.escape(entry).replace(r"\*", r"[^.]+"))


def _planned_modules(model: nn.Module, plan: dict, user_plan: bool) -> dict[str, tuple[str, str]]:
    """Module name -> (plan entry, style name), checking that the styles are known and the entries unambiguous."""
    if not isinstance(plan, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in plan.items()):
        raise ParallelizePlanError(f"a plan is a dict of module-name patterns to style names, got {plan!r:.120}.")
    for entry, style in plan.items():
        if style not in STYLES:
            raise ParallelizePlanError(
                f"plan entry {entry!r}: style {style!r} is not supported by parallelize (supported: "
                f"{', '.join(STYLES)}); pass a plan with that entry changed (e.g. to 'replicate')."
            )
    patterns = {entry: _pattern(entry) for entry in plan}
    planned = {}
    for name, _ in model.named_modules():
        matches = [entry for entry, pattern in patterns.items() if pattern.fullmatch(name)]
        if len({plan[entry] for entry in matches}) > 1:
            raise ParallelizePlanError(f"module {name!r} matches plan entries {matches} with different styles; keep one.")
        if matches:
            planned[name] = (matches[0], plan[matches[0]])
    unused = sorted(set(plan) - {entry for entry, _ in planned.values()})
    if user_plan and unused:
        raise ParallelizePlanError(
            f"plan entries {unused} name no module of {type(model).__name__}; entries name modules (not parameters), "
            "with * for one dotted component, e.g. 'model.layers.*.self_attn.q_proj'."
        )
    return planned


@dataclass
class _Swap:
    """One planned module: its style and what its parameters become (`layouts`: name -> (dim, stride) or None)."""

    name: str
    entry: str
    style_name: str
    style: _Style
    module: nn.Module
    layouts: dict
    kv_multiplier: int = 1
    head_dim: int = 0


def _fail(swap: _Swap, what: str) -> ParallelizePlanError:
    return ParallelizePlanError(f"module {swap.name!r} (plan entry {swap.entry!r}: {swap.style_name!r}): {what}")


def _layouts(swap: _Swap, world: int) -> dict:
    """Parameter name -> (partition dim, stride) for sharded, None for replicated; checks type and sizes."""
    style, module = swap.style, swap.module
    conv1d = _conv1d_type()
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


def _check_divides(swap: _Swap, size: int, parts: int, what: str) -> None:
    if size % parts:
        raise _fail(swap, f"its {what} ({size}) do not split into {parts} equal parts; choose another tensor parallel size.")


def _replicated_kv_type():
    """modules.qkv_linear.ReplicatedKVColumnParallelLinear, or None where that module is not there."""
    try:
        from .modules.qkv_linear import ReplicatedKVColumnParallelLinear
    except ImportError:
        return None
    return ReplicatedKVColumnParallelLinear


def _head_dim(module: nn.Module) -> int | None:
    value = getattr(module, "head_dim", getattr(module, "attention_head_size", None))
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _attention_updates(swaps: dict[str, _Swap], model: nn.Module, world: int) -> dict[str, dict]:
    """Attention module name -> its head-count attributes' per-rank values; sets each KV projection's multiplier."""
    by_parent: dict[str, list[_Swap]] = {}
    for swap in swaps.values():
        if swap.style.kind in ("column", "row"):
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
                if _replicated_kv_type() is None:
                    raise _fail(swap, f"its {count} key/value heads are fewer than the {world} ranks, and replicating "
                                      "them needs neuronx_distributed.modules.qkv_linear, which is not available.")
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


def _check_ties(model: nn.Module, swaps: dict[str, _Swap]) -> None:
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


# ---------------------------------------------------------------- building the layers


class _Shards:
    """The new parameters, one per original parameter (so tied weights stay tied)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self._made = rank, world, {}

    def get(self, param: nn.Parameter | None, layout) -> nn.Parameter | None:
        if param is None:
            return None
        if id(param) not in self._made:
            if layout is None:
                new = param
                set_tensor_model_parallel_attributes(new, False, 0, 1, self.world)
            else:
                dim, stride = layout
                if param.is_meta:
                    shape = list(param.shape)
                    shape[dim] //= self.world
                    data = torch.empty(shape, dtype=param.dtype, device="meta")
                else:
                    data = shard_of(param.detach(), dim, stride, self.rank, self.world)
                new = nn.Parameter(data, requires_grad=param.requires_grad)
                set_tensor_model_parallel_attributes(new, True, dim, stride, self.world)
            self._made[id(param)] = new
        return self._made[id(param)]


def _build(swap: _Swap, shards: _Shards, group) -> nn.Module:
    style, module = swap.style, swap.module
    if swap.kv_multiplier > 1:
        layer = _replicated_kv_type().from_linear(
            module, module.out_features // swap.head_dim, swap.head_dim, kv_size_multiplier=swap.kv_multiplier
        )
        return layer.train(module.training)
    if style.kind == "embedding":
        layer = ParallelEmbedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx, module.max_norm, module.norm_type,
            module.scale_grad_by_freq, module.sparse, device="meta", dtype=module.weight.dtype,
            shard_across_embedding=style.shard_across_embedding, tensor_model_parallel_group=group,
        )
    elif isinstance(module, nn.Linear):
        common = dict(bias=module.bias is not None, dtype=module.weight.dtype, device="meta",
                      tensor_model_parallel_group=group)
        if style.kind == "column":
            layer = ColumnParallelLinear(module.in_features, module.out_features, gather_output=style.gather_output,
                                         stride=style.blocks, **common)
        else:
            layer = RowParallelLinear(module.in_features, module.out_features,
                                      input_is_parallel=style.input_is_parallel, **common)
    elif style.kind == "column":
        layer = ColumnParallelConv1D(module, style.gather_output, style.blocks, group)
    else:
        layer = RowParallelConv1D(module, style.input_is_parallel, group)
    for name, layout in swap.layouts.items():
        setattr(layer, name, shards.get(getattr(module, name), layout))
    layer.train(module.training)
    return layer


def _materialize(model: nn.Module, device) -> None:
    """Meta parameters and buffers -> empty tensors on `device`; non-persistent buffers recomputed by the model."""
    made, recompute = {}, []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    new = nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                    for attribute in PARAMETER_ATTRIBUTES:
                        if hasattr(param, attribute):
                            setattr(new, attribute, getattr(param, attribute))
                    if get_weight_loader(param) is not None:
                        set_weight_loader(new, get_weight_loader(param))
                    made[id(param)] = new
                module._parameters[name] = made[id(param)]
        meta_buffers = [name for name, buffer in module._buffers.items() if buffer is not None and buffer.is_meta]
        for name in meta_buffers:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        if meta_buffers:
            recompute.append(module)
    init_weights = getattr(model, "_init_weights", None)
    if init_weights is not None:
        with torch.no_grad():
            for module in recompute:
                init_weights(module)


def parallelize(model: nn.Module, plan: dict[str, str] | None = None, *, device=None) -> nn.Module:
    """Make `model` tensor-parallel in place from `plan` (default: `model_plan(model)`); return it.

    `plan` replaces the model's plan (merge it yourself: `{**model.tp_plan, ...}`); its
    entries must each name a module. `device` is where a model built on the meta device
    is materialized (default: CPU). The layers use parallel_state's TP group. See the
    module docstring for the styles.
    """
    if not isinstance(model, nn.Module):
        raise ParallelizePlanError(f"parallelize takes a torch.nn.Module, got {type(model).__name__}.")
    user_plan = plan is not None
    plan = plan if user_plan else model_plan(model)
    if not plan:
        raise ParallelizePlanError(
            f"{type(model).__name__} carries no tensor-parallel plan (no tp_plan, config.base_model_tp_plan or "
            "FALLBACK_PLANS entry); pass one: parallelize(model, {'layers.*.mlp.up_proj': 'colwise', ...})."
        )
    group = parallel_state.get_tensor_model_parallel_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    swaps = {}
    for name, (entry, style_name) in _planned_modules(model, plan, user_plan).items():
        swap = _Swap(name, entry, style_name, STYLES[style_name], model.get_submodule(name), {})
        if swap.style.kind != "replicate":
            swap.layouts = _layouts(swap, world)
        swaps[name] = swap
    _check_ties(model, swaps)
    updates = _attention_updates(swaps, model, world)
    # Everything checked: from here on the model changes.
    shards = _Shards(rank, world)
    for swap in swaps.values():
        if swap.style.kind != "replicate":
            parent_name, _, child = swap.name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _build(swap, shards, group))
    for parent_name, values in updates.items():
        for attribute, value in values.items():
            setattr(model.get_submodule(parent_name), attribute, value)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        _materialize(model, torch.device("cpu") if device is None else torch.device(device))
    return model

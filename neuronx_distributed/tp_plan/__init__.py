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

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ParallelizePlanError
from ..parallel_layers import parallel_state
from .build import Shards, build, materialize
from .checks import Swap, attention_updates, check_ties, parameter_layouts
from .conv1d import ColumnParallelConv1D, RowParallelConv1D
from .sequence_parallel import apply_sequence_parallel, check_sequence_parallel
from .plans import FALLBACK_PLANS, STYLES, model_plan, planned_modules

__all__ = ["FALLBACK_PLANS", "STYLES", "ColumnParallelConv1D", "RowParallelConv1D", "model_plan", "parallelize"]


def parallelize(model: nn.Module, plan: dict[str, str] | None = None, *, device=None,
                sequence_parallel: bool = False) -> nn.Module:
    """Make `model` tensor-parallel in place from `plan` (default: `model_plan(model)`); return it.

    `plan` replaces the model's plan (merge it yourself: `{**model.tp_plan, ...}`); its
    entries must each name a module. `device` is where a model built on the meta device
    is materialized (default: CPU). The layers use parallel_state's TP group. See the
    module docstring for the styles. `sequence_parallel=True` (Llama-style causal LMs; see
    `tp_plan.sequence_parallel`) also cuts the sequence between the decoder layers'
    projections; the sequence length must then be a multiple of the TP size, and the norm
    gradients need `grads.allreduce_sequence_parallel_gradients` before the optimizer step.
    """
    if not isinstance(sequence_parallel, bool):
        raise ParallelizePlanError(f"sequence_parallel is True or False, got {sequence_parallel!r}.")
    if not isinstance(model, nn.Module):
        raise ParallelizePlanError(f"parallelize takes a torch.nn.Module, got {type(model).__name__}.")
    try:
        device = torch.device("cpu" if device is None else device)
    except (TypeError, RuntimeError) as error:
        raise ParallelizePlanError(f"device={device!r} is not a torch device ({error}); pass e.g. 'cpu' or 'cuda:0'.") from None
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
    for name, (entry, style_name) in planned_modules(model, plan, user_plan).items():
        swap = Swap(name, entry, style_name, STYLES[style_name], model.get_submodule(name))
        if swap.style.kind != "replicate":
            swap.layouts = parameter_layouts(swap, world)
        swaps[name] = swap
    if sequence_parallel:
        base, gather_logits = check_sequence_parallel(model, swaps, world)
    check_ties(model, swaps)
    updates = attention_updates(swaps, model, world)
    # Everything checked: from here on the model changes.
    shards = Shards(rank, world)
    for swap in swaps.values():
        if swap.style.kind != "replicate":
            parent_name, _, child = swap.name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, build(swap, shards, group))
    for parent_name, values in updates.items():
        for attribute, value in values.items():
            setattr(model.get_submodule(parent_name), attribute, value)
    if sequence_parallel:
        apply_sequence_parallel(model, base, gather_logits)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        materialize(model, device)
    return model

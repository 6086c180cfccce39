"""Megatron-style sequence parallelism for Llama-style Hugging Face causal LMs (`parallelize(..., sequence_parallel=True)`).

Between the decoder layers' row-parallel outputs and the next column-parallel inputs the
activations are cut along the sequence (dim 1 of `[batch, seq, hidden]`): each rank keeps
`seq / tp` positions through the residual adds and RMSNorms. The sequence is scattered at the
first decoder layer's input (so the embedding output, position ids, rotary embeddings and
causal mask stay full-sequence, as transformers computes them). The MLP's column-parallel
layers and the `lm_head` all-gather it; every row-parallel layer reduce-scatters instead of
all-reducing. The attention forward takes its sequence length from its input, so the
sequence is all-gathered at the `self_attn` input instead, and q/k/v stay plain column layers
(backward: their all-reduce, then this rank's chunk, where Megatron reduce-scatters once).
The norm weights that see a chunk are marked `sequence_parallel_enabled`, so
`grads.allreduce_sequence_parallel_gradients` (the trainer's `NxDOptimizer` with
`sequence_parallel=True`) sums their gradients over the TP group.

Only families whose decoder layer runs token-wise ops alone between those projections are
accepted (checked in transformers 5: `SEQUENCE_PARALLEL_MODEL_TYPES`); the logits come out
full-sequence, so `logits_to_keep` (generation) is not supported under sequence parallelism.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..errors import ParallelizePlanError
from ..parallel_layers import parallel_state
from ..parallel_layers.layers import BaseParallelLinear
from ..parallel_layers.mappings import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from .checks import Swap, parameter_layouts

SEQUENCE_PARALLEL_MODEL_TYPES = ("llama", "qwen2")
SEQUENCE_DIMENSION = 1  # Hugging Face activations are [batch, seq, hidden]


def check_sequence_parallel(model: nn.Module, swaps: dict[str, Swap], world: int) -> tuple[nn.Module, bool]:
    """Raise ParallelizePlanError unless `model` can run sequence-parallel; mark the swaps that do.

    Returns the base model and whether the logits are to be gathered over the vocabulary: a
    sequence-parallel column layer cannot gather its output itself, so a `colwise_gather_output`
    lm_head becomes a sharded one whose output `apply_sequence_parallel` gathers.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(model, "base_model", model)
    if model_type not in SEQUENCE_PARALLEL_MODEL_TYPES or base is model or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise ParallelizePlanError(
            f"sequence_parallel=True supports Llama-style decoder causal LMs with `model.model.layers` "
            f"(model types {', '.join(SEQUENCE_PARALLEL_MODEL_TYPES)}), not {type(model).__name__} "
            f"(model type {model_type!r}); call parallelize without sequence_parallel for it."
        )
    prefix = next(name for name, module in model.named_modules() if module is base)
    head = swaps.get("lm_head")
    if head is None or head.style.kind != "column":
        raise ParallelizePlanError(
            "sequence_parallel=True needs the lm_head planned 'colwise' or 'colwise_gather_output' (it gathers "
            f"the sequence), got {head.style_name if head else 'no entry'!r}."
        )
    for name, module in model.named_modules():
        if not name.startswith(f"{prefix}.layers.") or not isinstance(module, nn.Linear):
            continue
        swap = swaps.get(name)
        sharded_inside = swap is not None and (
            (swap.style.kind == "column" and not swap.style.gather_output)
            or (swap.style.kind == "row" and swap.style.input_is_parallel)
        )
        if not sharded_inside:
            raise ParallelizePlanError(
                f"sequence_parallel=True needs every projection in the decoder layers planned 'colwise', "
                f"'packed_colwise' or 'rowwise'; {name!r} is {swap.style_name if swap else 'not planned'!r}."
            )
        swap.sequence_parallel = swap.style.kind == "row" or ".self_attn." not in name
    head.sequence_parallel = True
    gather_logits = head.style.gather_output
    if gather_logits:
        head.style = replace(head.style, gather_output=False)
        head.layouts = parameter_layouts(head, world)
    return base, gather_logits


def apply_sequence_parallel(model: nn.Module, base: nn.Module, gather_logits: bool) -> None:
    """Scatter the sequence at the first decoder layer, mark the chunk-seeing norm weights, gather logits if planned."""
    base.layers[0].register_forward_pre_hook(_scatter_sequence, with_kwargs=True)
    for layer in base.layers:
        layer.self_attn.register_forward_pre_hook(_gather_sequence, with_kwargs=True)
    for module in (*base.layers, base.norm):
        for sub in module.modules():
            if not isinstance(sub, BaseParallelLinear):  # the parallel layers mark their own parameters
                for param in sub.parameters(recurse=False):
                    param.sequence_parallel_enabled = True
    if gather_logits:
        model.lm_head.register_forward_hook(_gather_vocabulary)


def _on_hidden_states(args, kwargs, function):
    """The hook's (args, kwargs) with `function` applied to hidden_states (first positional or keyword)."""
    if args:
        return (function(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": function(kwargs["hidden_states"])}


def _scatter_sequence(module, args, kwargs):
    group = parallel_state.get_tensor_model_parallel_group()
    return _on_hidden_states(args, kwargs, lambda x: scatter_to_sequence_parallel_region(x, SEQUENCE_DIMENSION, group))


def _gather_sequence(module, args, kwargs):
    """Full sequence for the attention; backward keeps this rank's chunk (q/k/v's backward all-reduced it)."""
    group = parallel_state.get_tensor_model_parallel_group()
    return _on_hidden_states(
        args, kwargs, lambda x: gather_from_sequence_parallel_region(x, False, SEQUENCE_DIMENSION, group)
    )


def _gather_vocabulary(module, args, output):
    return gather_from_tensor_model_parallel_region(output, parallel_state.get_tensor_model_parallel_group())

"""Plans: the styles parallelize knows, the plans of families transformers ships without one, and matching.

A plan maps module-name patterns (`*`: one dotted component) to style names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import ParallelizePlanError

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

@dataclass(frozen=True)
class Style:
    """How one plan style shards a module: `kind` is column, row, embedding or replicate."""

    kind: str
    gather_output: bool = False
    input_is_parallel: bool = True
    blocks: int = 1
    shard_across_embedding: bool = False


STYLES = {
    "colwise": Style("column"),
    "colwise_gather_output": Style("column", gather_output=True),
    "colwise_rep": Style("column", gather_output=True),
    "packed_colwise": Style("column", blocks=2),
    "qkv_colwise": Style("column", blocks=3),
    "rowwise": Style("row"),
    "rowwise_split_input": Style("row", input_is_parallel=False),
    "rowwise_rep": Style("row", input_is_parallel=False),
    "embedding_rowwise": Style("embedding"),
    "embedding_colwise": Style("embedding", shard_across_embedding=True),
    "replicate": Style("replicate"),
}


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


def planned_modules(model: nn.Module, plan: dict, user_plan: bool) -> dict[str, tuple[str, str]]:
    """Module name -> (plan entry, style name), checking that the styles are known and the entries unambiguous.

    An entry matching no module is an error in a plan the user gives and skipped in the model's own
    (a config can leave a planned module out); one naming a parameter is an error in either.
    """
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
    parameters = [name for name, _ in model.named_parameters()]
    for entry in unused:
        named = next((name for name in parameters if patterns[entry].fullmatch(name)), None)
        if named is not None:
            raise ParallelizePlanError(
                f"plan entry {entry!r} ({plan[entry]!r}) names the parameter {named!r}; parallelize shards modules "
                "(nn.Linear, Conv1D, nn.Embedding), not bare parameters such as fused expert weights."
            )
    if user_plan and unused:
        raise ParallelizePlanError(
            f"plan entries {unused} name no module of {type(model).__name__}; entries name modules (not parameters), "
            "with * for one dotted component, e.g. 'model.layers.*.self_attn.q_proj'."
        )
    return planned

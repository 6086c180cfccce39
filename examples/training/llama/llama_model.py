"""transformers' LlamaForCausalLM (grouped-query attention) made tensor-parallel by `neuronx_distributed.parallelize`.

The model is the unmodified Hugging Face class, built from a config on CPU with
one seed (so every TP degree starts from the same weights) and then sharded in
place from the plan it carries: the embeddings split by vocabulary, q/k/v and the
MLP's gate/up projections by output (heads, with KV heads replicated where TP
exceeds their count), o_proj and down_proj by input. The lm_head, split by
vocabulary, keeps its logits sharded (the plan's entry overridden), and the loss
is `parallel_cross_entropy` of those shards: no rank ever holds full-vocabulary
logits. With sequence parallelism the residual stream and RMSNorms between the
projections hold only this rank's chunk of the sequence.

Presets (`MODEL_CONFIGS`): `tiny` for tests, and the shapes of Llama 3.2 1B and
Llama 3 8B (widths, depths, heads, RoPE theta). The vocabulary is the tokenizer's
that the data builder uses, padded to a multiple of 128 (every TP degree up to
128 divides it), not Llama's own; the embeddings are untied.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neuronx_distributed import parallelize
from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy

VOCAB_PADDING_MULTIPLE = 128

MODEL_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0),
}  # fmt: skip


class ModelConfigError(ValueError):
    """The model configuration cannot be built or split over the requested tensor-parallel degree."""


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE


def llama_config(name: str, vocab_size: int, seq_len: int, num_layers: int | None = None) -> LlamaConfig:
    """The LlamaConfig of preset `name` for a tokenizer of `vocab_size` ids, optionally cut to `num_layers` layers."""
    if name not in MODEL_CONFIGS:
        raise ModelConfigError(f"unknown model config {name!r}; choose one of {sorted(MODEL_CONFIGS)}.")
    shape = dict(MODEL_CONFIGS[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ModelConfigError(f"--num_layers must be at least 1, got {num_layers}.")
        shape["num_hidden_layers"] = num_layers
    return LlamaConfig(
        vocab_size=padded_vocab_size(vocab_size),
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        **shape,
    )


def build_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """The unsharded LlamaForCausalLM(config), initialized from `seed` on CPU."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_parallel_llama(config: LlamaConfig, seed: int, sequence_parallel: bool = False) -> LlamaForCausalLM:
    """`build_llama(config, seed)` sharded in place from its own tp_plan, the lm_head's logits left vocabulary-sharded.

    `sequence_parallel`: the decoder layers' norms and residuals run on this rank's chunk of the
    sequence (`parallelize(..., sequence_parallel=True)`); the lm_head gathers it back.
    """
    model = build_llama(config, seed)
    return parallelize(model, {**model.tp_plan, "lm_head": "colwise"}, sequence_parallel=sequence_parallel)


def causal_lm_loss_sum(model: LlamaForCausalLM, samples: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy of `samples` ([batch, seq_len + 1] token ids) from vocabulary-sharded logits."""
    inputs, labels = samples[:, :-1], samples[:, 1:]
    hidden = model.model(input_ids=inputs).last_hidden_state
    return parallel_cross_entropy(model.lm_head(hidden), labels).sum()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())

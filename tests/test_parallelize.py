"""parallelize: unmodified Hugging Face models made tensor-parallel from their tp_plan, against the models themselves.

Each family is built from a tiny random config with a fixed seed on every rank. The
parallel copy's logits, loss, gradients and one AdamW step must equal the unmodified
single-process model's; a meta-device model parallelized and loaded from the
reference's `save_pretrained` folder must compute the same logits; and the
parallel model saved with `parallel_layers.save`, merged by `nxd checkpoint merge`,
must be read back by `from_pretrained` as the stepped reference.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from models import expected_shard
from torch import nn

from neuronx_distributed import cli, parallel_state
from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy
from neuronx_distributed.parallel_layers.mappings import gather_from_tensor_model_parallel_region
from neuronx_distributed.errors import ParallelizePlanError
from neuronx_distributed.parallel_layers import ParallelEmbedding, load, save
from neuronx_distributed.parallel_layers.grads import allreduce_sequence_parallel_gradients
from neuronx_distributed.parallel_layers.layers import BaseParallelLinear
from neuronx_distributed.parallel_layers.weight_loading import get_weight_loader
from neuronx_distributed.tp_plan import parallelize

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB, BATCH, SEQ = 128, 2, 8


def _family(name: str):
    """(model class, config, number of modules the plan replaces) of a tiny random model."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2)
    if name == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads; eager attention reads
        # num_key_value_groups (SDPA, which Qwen2 uses here, infers the grouping from the shapes)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64,
                                          attn_implementation="eager", **common)
        return transformers.LlamaForCausalLM, config, 2 * 7 + 2
    if name == "qwen2":  # q/k/v biases, 8 query heads, 4 key/value heads
        config = transformers.Qwen2Config(hidden_size=64, intermediate_size=64, num_attention_heads=8,
                                          num_key_value_heads=4, max_position_embeddings=64, **common)
        return transformers.Qwen2ForCausalLM, config, 2 * 7 + 2
    if name == "gpt2":  # Conv1D layers, fused c_attn, lm_head tied to wte
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel, config, 2 * 4 + 2
    if name == "bert":  # MLM decoder tied to the word embeddings, its bias to cls.predictions.bias
        config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                         max_position_embeddings=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, **common)
        return transformers.BertForMaskedLM, config, 2 * 6 + 2
    raise AssertionError(name)


def _batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[:, ::3] = -100
    return ids, labels


def _expected(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The slice (or, for replicated key/value heads, the per-parameter loader's shard) of a reference tensor."""
    loader = get_weight_loader(param)
    if loader is not None:
        return loader(list(full.shape), lambda dim, start, stop: full if dim is None else full.narrow(dim, start, stop - start))
    return expected_shard(full, param, parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_size())


def _check_against(model: nn.Module, reference: nn.Module, what: str) -> None:
    references = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        full = references[name] if what == "value" else references[name].grad
        actual = param if what == "value" else param.grad
        torch.testing.assert_close(actual, _expected(full, param), **TOL, msg=lambda m: f"{what} of {name}: {m}")


def _parallelize_family(family: str, folder: str):
    """Worker: parallelize a model of `family` and compare it with the unmodified model; return the stepped reference."""
    model_class, config, replaced = _family(family)
    torch.manual_seed(0)
    reference = model_class(config)
    if torch.distributed.get_rank() == 0:
        reference.save_pretrained(os.path.join(folder, "hf"))
    torch.distributed.barrier()

    model = parallelize(copy.deepcopy(reference))
    parallel_layers = [m for m in model.modules() if isinstance(m, (BaseParallelLinear, ParallelEmbedding))]
    assert len(parallel_layers) == replaced
    _check_against(model, reference, "value")

    ids, labels = _batch()
    expected = reference(input_ids=ids, labels=labels)
    actual = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, **TOL)
    torch.testing.assert_close(actual.loss, expected.loss, **TOL)
    expected.loss.backward()
    actual.loss.backward()
    _check_against(model, reference, "grad")
    # Adam's first step is lr * g / (|g| + eps): for a gradient near zero, whose last bits depend on the
    # summation order, it amplifies those bits up to lr / eps. eps=1e-3 (not 1e-8) keeps that factor at 10,
    # so the step is compared at the same tolerance as everything else.
    for module in (reference, model):
        torch.optim.AdamW(module.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1).step()
    _check_against(model, reference, "value")
    save({"model": model.state_dict()}, os.path.join(folder, "ckpt"))

    with torch.device("meta"):
        empty = model_class(config)
    empty = parallelize(empty)
    load(os.path.join(folder, "hf"), empty, sharded=False)
    torch.testing.assert_close(empty(input_ids=ids).logits, expected.logits, **TOL)
    return {name: tensor.clone() for name, tensor in reference.state_dict().items()}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_parallelize_family(pools, tmp_path, family, tp):
    stepped = pools.run(tp, tp, _parallelize_family, family, str(tmp_path))[0]
    merged = tmp_path / "merged"
    assert cli.main(["checkpoint", "merge", str(tmp_path / "ckpt"), str(merged)]) == 0
    shutil.copy(tmp_path / "hf" / "config.json", merged / "config.json")
    model_class, _, _ = _family(family)
    reloaded = model_class.from_pretrained(merged).state_dict()
    assert reloaded.keys() == stepped.keys()
    for name, tensor in stepped.items():
        torch.testing.assert_close(reloaded[name], tensor, **TOL, msg=lambda m: f"{name}: {m}")


class PackedMLP(nn.Module):
    """A model of our own with a fused [gate; up] projection, for a plan given by the user."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(8, 2 * 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


def _other_styles():
    """Worker: packed_colwise, embedding_colwise, rowwise_split_input and vocabulary-sharded logits vs the originals."""
    torch.manual_seed(0)
    reference = PackedMLP()
    model = parallelize(copy.deepcopy(reference), {"gate_up": "packed_colwise", "down": "rowwise"})
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), reference(x), **TOL)
    _check_against(model, reference, "value")

    model_class, config, _ = _family("llama")
    torch.manual_seed(0)
    reference = model_class(config)
    plan = {**reference.tp_plan, "model.embed_tokens": "embedding_colwise", "lm_head": "colwise",
            "model.layers.*.mlp.gate_proj": "colwise_gather_output", "model.layers.*.mlp.up_proj": "colwise_gather_output",
            "model.layers.*.mlp.down_proj": "rowwise_split_input"}
    model = parallelize(copy.deepcopy(reference), plan)
    assert model.model.embed_tokens.weight.shape == (VOCAB, 32 // parallel_state.get_tensor_model_parallel_size())
    ids, labels = _batch()
    expected = reference(input_ids=ids)
    logits = model(input_ids=ids).logits  # this rank's [..., VOCAB / tp] shard
    assert logits.shape[-1] == VOCAB // parallel_state.get_tensor_model_parallel_size()
    torch.testing.assert_close(gather_from_tensor_model_parallel_region(logits), expected.logits, **TOL)
    targets = labels[:, 1:]
    loss = parallel_cross_entropy(logits[:, :-1], targets).sum() / (targets != -100).sum()
    expected_loss = torch.nn.functional.cross_entropy(expected.logits[:, :-1].flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected_loss, **TOL)
    loss.backward()
    expected_loss.backward()
    _check_against(model, reference, "grad")


def test_other_styles_and_sharded_logits(pools):
    pools.run(2, 2, _other_styles)


def _bad_plans():
    """Worker: each bad plan raises ParallelizePlanError and leaves the model as it was; return the messages."""
    model_class, config, _ = _family("llama")
    torch.manual_seed(0)
    model = model_class(config)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as tie_word_embeddings=True does
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    types = [type(module) for module in model.modules()]
    plans = {
        "unknown style": {**model.tp_plan, "model.norm": "sequence_parallel"},
        "module the style cannot shard": {**model.tp_plan, "model.norm": "colwise"},
        "entry naming nothing": {**model.tp_plan, "model.decoder.*.fc1": "colwise"},
        "tie sharded one way only": {**model.tp_plan, "lm_head": "replicate"},
        "entry naming a parameter": {**model.tp_plan, "model.layers.*.mlp.up_proj.weight": "colwise"},
    }
    messages = {}
    for case, plan in plans.items():
        with pytest.raises(ParallelizePlanError) as error:
            parallelize(model, plan)
        messages[case] = str(error.value)
        assert [type(module) for module in model.modules()] == types, case
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), (case, name)
    with pytest.raises(ParallelizePlanError, match="carries no tensor-parallel plan"):
        parallelize(nn.Sequential(nn.Linear(4, 4)))
    return messages


def test_bad_plans_raise_on_every_rank_and_change_nothing(pools):
    messages = pools.run(2, 2, _bad_plans)
    assert messages[0] == messages[1]
    assert "sequence_parallel" in messages[0]["unknown style"] and "model.norm" in messages[0]["unknown style"]
    assert "'model.norm'" in messages[0]["module the style cannot shard"]
    assert "model.decoder.*.fc1" in messages[0]["entry naming nothing"]
    assert "lm_head.weight" in messages[0]["tie sharded one way only"]
    assert "'model.layers.0.mlp.up_proj.weight'" in messages[0]["entry naming a parameter"]


def _sequence_parallel():
    """Worker: Llama (GQA) with sequence parallelism vs the unmodified model; GPT-2 refused and unchanged."""
    model_class, config, _ = _family("llama")
    torch.manual_seed(0)
    reference = model_class(config)
    model = parallelize(copy.deepcopy(reference), sequence_parallel=True)
    layers = [m for m in model.modules() if isinstance(m, BaseParallelLinear)]
    assert len(layers) == 2 * 7 + 1
    gathering = [name for name, m in model.named_modules() if getattr(m, "sequence_parallel_enabled", False)]
    assert len(gathering) == 2 * 4 + 1 and "lm_head" in gathering  # o_proj, gate/up/down_proj per layer
    ids, labels = _batch()
    expected = reference(input_ids=ids, labels=labels)
    actual = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, **TOL)
    torch.testing.assert_close(actual.loss, expected.loss, **TOL)
    expected.loss.backward()
    actual.loss.backward()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1) for m in (reference, model)]
    allreduce_sequence_parallel_gradients(optimizers[1])  # the norms saw this rank's chunk of the sequence
    _check_against(model, reference, "grad")
    for optimizer in optimizers:
        optimizer.step()
    _check_against(model, reference, "value")

    gpt2_class, gpt2_config, _ = _family("gpt2")
    gpt2 = gpt2_class(gpt2_config)
    before = {name: tensor.clone() for name, tensor in gpt2.state_dict().items()}
    with pytest.raises(ParallelizePlanError, match="sequence_parallel=True supports Llama-style"):
        parallelize(gpt2, sequence_parallel=True)
    assert not any(isinstance(m, BaseParallelLinear) for m in gpt2.modules())
    for name, tensor in gpt2.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_sequence_parallel_llama_matches_unsharded_and_gpt2_is_refused(pools):
    pools.run(2, 2, _sequence_parallel)

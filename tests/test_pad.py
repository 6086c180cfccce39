"""Head padding (`parallel_layers.pad`, the layers' `pad=True`) against the unpadded single-process model.

Sizes the TP degree does not divide (7 MLP features, 7 or 14 attention heads, a vocabulary
of 13) are padded with zeros; forward outputs, input gradients, the real part of every
gradient and the parameters after AdamW steps (with weight decay) must equal the unpadded
torch.nn model's, and the padding must stay exactly zero. Unsharded checkpoints load into
padded layers and sharded saves keep the padded shards; bad arguments raise typed errors on every rank.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from models import MLP, SelfAttention, same_seed_twins
from safetensors.torch import save_file
from torch import nn

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import (
    CheckpointShapeError,
    InputShapeError,
    LayerConfigError,
    LayerFeatureNotSupportedError,
)
from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, load, save
from neuronx_distributed.parallel_layers.pad import generate_padding_mask, get_number_of_extra_heads, pad_model

HIDDEN, ODD_FFN, ODD_VOCAB, BATCH, SEQ = 8, 7, 13, 2, 3
TOL = dict(rtol=1e-5, atol=1e-5)
# (TP size, heads, head size): head counts that the TP size does not divide.
ATTENTION_SHAPES = [(2, 7, 4), (4, 14, 2)]


def _tp():
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


def _padded_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The reference tensor padded with zeros to the parameter's full padded size, then this rank's chunk."""
    rank, size = _tp()
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    zeros = list(full.shape)
    zeros[dim] = param.shape[dim] * size - full.shape[dim]
    return torch.cat([full, full.new_zeros(zeros)], dim=dim).chunk(size, dim=dim)[rank]


def _assert_matches(reference: nn.Module, model: nn.Module, what: str, grads: bool) -> None:
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        ref = ref_params[name].grad if grads else ref_params[name].detach()
        value = param.grad if grads else param.detach()
        torch.testing.assert_close(value, _padded_slice(ref, param), **TOL, msg=f"{what} {name}")
        padding = _padded_slice(torch.ones_like(ref), param) == 0
        assert not value[padding].any(), f"{what} {name}: the padding is not exactly zero"


def _train_like_reference(reference, model, make_input, steps=2, seed=0):
    """Forward, backward and AdamW (with weight decay) steps of both models; each result compared.

    eps is large enough that a gradient that is zero but for rounding (an attention key's
    bias) is not scaled up into a full step, in which the two models' roundings would differ.
    """
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.1, eps=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, eps=1e-3)
    for step in range(steps):
        torch.manual_seed(seed + step)  # the same inputs on every rank
        inputs = make_input()
        ref_in = inputs.clone().requires_grad_(inputs.is_floating_point())
        tp_in = inputs.clone().requires_grad_(inputs.is_floating_point())
        ref_out, out = reference(ref_in), model(tp_in)
        torch.testing.assert_close(out, ref_out, **TOL)
        grad_out = torch.randn_like(ref_out)
        (ref_out * grad_out).sum().backward()
        (out * grad_out).sum().backward()
        if inputs.is_floating_point():
            torch.testing.assert_close(tp_in.grad, ref_in.grad, **TOL)
        _assert_matches(reference, model, f"step {step} grad", grads=True)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
        _assert_matches(reference, model, f"step {step} param", grads=False)


class _SigmoidMLP(MLP):
    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def _hidden_input():
    return torch.randn(BATCH, SEQ, HIDDEN)


def _case_padded_layers():
    rank, size = _tp()
    padded = ODD_FFN + get_number_of_extra_heads(ODD_FFN, size)

    # MLP: Column(gather_output=False) pads its output features, Row(input_is_parallel=True) its input ones.
    reference, model = _twins(lambda parallel: MLP(HIDDEN, ODD_FFN, parallel, pad=True), seed=1)
    assert tuple(model.fc1.weight.shape) == (padded // size, HIDDEN)
    assert tuple(model.fc2.weight.shape) == (HIDDEN, padded // size)
    assert model.fc1.pad_size == model.fc2.pad_size == padded - ODD_FFN
    _train_like_reference(reference, model, _hidden_input)
    # With sigmoid(0) = 0.5 the padded features are not zero: fc2 must not let them reach its output or grads.
    _train_like_reference(*_twins(lambda parallel: _SigmoidMLP(HIDDEN, ODD_FFN, parallel, pad=True), seed=10),
                          _hidden_input)

    # A gathered Column output drops the padding; a full Row input is padded before it is split.
    def column(parallel):
        return ColumnParallelLinear(HIDDEN, ODD_FFN, pad=True) if parallel else nn.Linear(HIDDEN, ODD_FFN)

    def row(parallel):
        return RowParallelLinear(ODD_FFN, HIDDEN, pad=True) if parallel else nn.Linear(ODD_FFN, HIDDEN)

    _train_like_reference(*_twins(column, seed=2), _hidden_input)
    _train_like_reference(*_twins(row, seed=3), lambda: torch.randn(BATCH, SEQ, ODD_FFN))

    for shard_across_embedding in (False, True):
        def embedding(parallel):
            if parallel:
                return ParallelEmbedding(
                    ODD_VOCAB, ODD_FFN, padding_idx=2, pad=True, shard_across_embedding=shard_across_embedding
                )
            return nn.Embedding(ODD_VOCAB, ODD_FFN, padding_idx=2)

        _train_like_reference(*_twins(embedding, seed=4), lambda: torch.randint(0, ODD_VOCAB, (BATCH, SEQ)))
    return True


def _twins(build, seed):
    """Reference and padded TP model from the same seed: the real part of each shard is the reference's slice."""
    torch.manual_seed(seed)
    reference = build(parallel=False)
    torch.manual_seed(seed)
    model = build(parallel=True)
    _assert_matches(reference, model, "initial", grads=False)
    return reference, model


def _full(param: torch.Tensor) -> torch.Tensor:
    return comm.all_gather(param.detach(), dim=param.partition_dim) if param.tensor_model_parallel else param.detach()


def _case_padded_attention(heads, head_dim):
    rank, size = _tp()
    hidden = heads * head_dim
    padded_heads = heads + get_number_of_extra_heads(heads, size)
    reference, model = same_seed_twins(lambda parallel: SelfAttention(hidden, heads, parallel), seed=5)

    def set_heads(module, ratio):
        if isinstance(module, SelfAttention):
            module.heads = round(heads * ratio) // size

    assert pad_model(model, size, heads, wrapped_classes=(SelfAttention,), pad_hook_fn=set_heads) is model
    assert model.heads == padded_heads // size
    for name in ("query", "key", "value"):
        layer = getattr(model, name)
        assert layer.output_size == padded_heads * head_dim and layer.pad_size == (padded_heads - heads) * head_dim
        # Same-seed contract: the unpadded part of the full weight is the reference's; the rest is zero.
        full = _full(layer.weight)
        assert torch.equal(full[:hidden], getattr(reference, name).weight.detach())
        assert not full[hidden:].any()
    assert torch.equal(_full(model.output.weight)[:, :hidden], reference.output.weight.detach())

    # The heads that generate_padding_mask marks as padding give exactly zero queries.
    mask = generate_padding_mask(heads, padded_heads, heads, size, rank)
    assert int(mask.sum()) == min(max(heads - rank * (padded_heads // size), 0), padded_heads // size)
    queries = model.query(torch.randn(BATCH, SEQ, hidden)).unflatten(-1, (-1, head_dim))
    assert not queries[..., ~mask, :].any() and queries[..., mask, :].abs().sum() > 0

    _train_like_reference(reference, model, lambda: torch.randn(BATCH, SEQ, hidden), steps=2, seed=6)
    return True


def _case_checkpoints_of_padded_layers(folder):
    rank, size = _tp()
    torch.manual_seed(7)
    reference = MLP(HIDDEN, ODD_FFN, parallel=False)
    unpadded = os.path.join(folder, "mlp.safetensors")
    if dist.get_rank() == 0:
        save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, unpadded)
    dist.barrier()
    torch.manual_seed(8)  # different initial weights: the load must overwrite all of them
    model = MLP(HIDDEN, ODD_FFN, parallel=True, pad=True)
    load(unpadded, model, sharded=False)
    _assert_matches(reference, model, "loaded", grads=False)

    # A sharded save holds the padded shards: the manifest's global shapes are padded, and it loads back.
    sharded = os.path.join(folder, "sharded")
    save(model.state_dict(), sharded, model_key=None)
    with open(os.path.join(sharded, "manifest.json")) as file:
        shapes = {name: entry["shape"] for name, entry in json.load(file)["tensors"].items()}
    padded = ODD_FFN + get_number_of_extra_heads(ODD_FFN, size)
    assert shapes["fc1.weight"] == [padded, HIDDEN] and shapes["fc2.weight"] == [HIDDEN, padded], shapes
    torch.manual_seed(10)
    restored = MLP(HIDDEN, ODD_FFN, parallel=True, pad=True)
    load(sharded, restored, model_key=None)
    _assert_matches(reference, restored, "loaded sharded", grads=False)

    # Any other full shape is refused with a typed error on every rank, the padded one included
    # (7 features padded to 8 at TP=2 and TP=4): a real 8th feature would be dropped silently.
    # Only fc2's tensors are wrong here: the refusal comes before fc1 (read first) is changed.
    wrong = os.path.join(folder, "wrong.safetensors")
    if dist.get_rank() == 0:
        state = {key: value.contiguous() for key, value in reference.state_dict().items()}
        state["fc2.weight"] = torch.zeros(HIDDEN, ODD_FFN + 1)
        save_file(state, wrong)
    dist.barrier()
    target = MLP(HIDDEN, ODD_FFN, parallel=True, pad=True)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(CheckpointShapeError, match="unpadded"):
        load(wrong, target, sharded=False)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"
    return True


def _case_bad_arguments():
    rank, size = _tp()
    model = SelfAttention(4 * size, size, parallel=True)
    before = [param for param in model.parameters()]
    with pytest.raises(LayerConfigError, match="tp_degree"):
        pad_model(model, size * 2, size + 1)
    with pytest.raises(LayerConfigError, match="whole number of heads"):
        pad_model(model, size, 3 * size + 1)
    with pytest.raises(LayerConfigError, match="n_heads"):
        pad_model(model, size, 0)
    with pytest.raises(LayerConfigError, match="wrapped_classes"):
        pad_model(model, size, size, wrapped_classes=("SelfAttention",))
    assert [param for param in model.parameters()] == before  # nothing changed
    with pytest.raises(LayerFeatureNotSupportedError, match="stride"):
        pad_model(SelfAttention(4 * size, size, parallel=True, fused_qkv=True), size, size + 1)
    with pytest.raises(LayerConfigError, match="hardware_type"):
        generate_padding_mask(48, 64, 8, 32, 0, hardware_type="trn999")
    with pytest.raises(LayerConfigError, match="num_heads_with_pad"):
        generate_padding_mask(48, 50, 8, 32, 0)
    with pytest.raises(InputShapeError, match=str(ODD_FFN)):
        RowParallelLinear(ODD_FFN, HIDDEN, pad=True)(torch.randn(2, ODD_FFN + 1))
    with pytest.raises(InputShapeError, match=f"outside \\[0, {ODD_VOCAB}\\)"):
        ParallelEmbedding(ODD_VOCAB, HIDDEN, pad=True)(torch.tensor([ODD_VOCAB]))  # a padded row, not a token
    return True


@pytest.mark.parametrize("size", [2, 4])
def test_padded_layers_train_like_the_unpadded_model(pools, size):
    assert pools.run(size, size, _case_padded_layers) == [True] * size


@pytest.mark.parametrize("size, heads, head_dim", ATTENTION_SHAPES)
def test_pad_model_attention_equals_unpadded(pools, size, heads, head_dim):
    assert pools.run(size, size, _case_padded_attention, heads, head_dim) == [True] * size


@pytest.mark.parametrize("size", [2, 4])
def test_padded_layers_load_unsharded_checkpoints_and_save_padded_shards(pools, size, tmp_path):
    assert pools.run(size, size, _case_checkpoints_of_padded_layers, str(tmp_path)) == [True] * size


def test_bad_arguments_raise_typed_errors_on_every_rank(pools):
    assert pools.run(2, 2, _case_bad_arguments) == [True, True]


def test_extra_heads_and_padding_masks_match_upstream_layouts():
    assert [get_number_of_extra_heads(n, 4) for n in (12, 13, 14, 15)] == [0, 3, 2, 1]
    # 48 query heads padded to 64, 8 KV heads, TP=32: upstream's two replication layouts.
    trn1 = torch.stack([generate_padding_mask(48, 64, 8, 32, rank, "trn1") for rank in range(32)])
    trn2 = torch.stack([generate_padding_mask(48, 64, 8, 32, rank, "trn2") for rank in range(32)])
    assert not trn1[24:].any() and trn1[:24].all()
    assert not trn2[3::4].any() and int(trn2.sum()) == 48
    # 200 heads padded to 224: three of each last replica's seven heads are padding.
    trn1 = torch.stack([generate_padding_mask(200, 224, 8, 32, rank, "trn1") for rank in range(32)])
    assert trn1[:24].all() and trn1[24:, :4].all() and not trn1[24:, 4:].any()
    # Multi-head attention: the padded heads are the last ones (pad_model's layout).
    assert generate_padding_mask(14, 16, 14, 4, 3).tolist() == [True, True, False, False]

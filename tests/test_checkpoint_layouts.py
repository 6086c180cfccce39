"""Checkpoints from what the layers declare: a copied or cast state dict saves with the model's layouts.

Each case saves, at TP=2 over real processes, the state dict itself or a copy or
cast of it with `model=` given; merging and resharding must give the values of the
TP=1 model built from the same seed (cast alike). Without the model a copy is
refused, and so is the state dict itself, whose tied decoder weight (held by a plain
module) carries no attributes. The state dict itself also goes through a plain
`torch.save` and `torch.load(weights_only=True)` with its compatibility attributes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from models import SelfAttention
from safetensors.torch import load_file
from torch import nn

from neuronx_distributed.errors import CheckpointArgumentError, ReplicatedMismatchError
from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear
from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, load, save
from neuronx_distributed.parallel_layers.checkpoint_tools import merge, reshard
from neuronx_distributed.parallel_layers.layouts import Layout, model_layouts

HIDDEN, HEADS, VOCAB, SEED = 16, 4, 24, 77
Q_HEADS, KV_HEADS, HEAD_DIM = 4, 1, 4


class TiedNet(nn.Module):
    """A vocab-parallel embedding tied to a plain decoder, a fused (stride 3) QKV, a GQA layer with replicated KV."""

    def __init__(self, kv_size_multiplier: int):
        super().__init__()
        self.embed = ParallelEmbedding(VOCAB, HIDDEN)
        self.attention = SelfAttention(HIDDEN, HEADS, parallel=True, fused_qkv=True)
        self.gqa = GQAQKVColumnParallelLinear(
            HIDDEN, [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], kv_size_multiplier=kv_size_multiplier
        )
        self.head = ColumnParallelLinear(HIDDEN, 8)
        self.decoder = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.decoder.weight = self.embed.weight  # tied: a plain module holds the parallel layer's parameter
        self.norm = nn.LayerNorm(HIDDEN)


def _model(kv_size_multiplier: int = 2) -> TiedNet:
    torch.manual_seed(SEED)
    return TiedNet(kv_size_multiplier)


def _case_reference() -> dict[str, torch.Tensor]:
    """The TP=1 model's state dict (each KV head once), which a merge of any TP degree must give."""
    return dict(_model(kv_size_multiplier=1).state_dict())


COPIES = {
    "itself": lambda state: state,
    "clone": lambda state: {key: value.clone() for key, value in state.items()},
    "bf16": lambda state: {key: value.to(torch.bfloat16) for key, value in state.items()},
}


def _case_save(save_dir: str, copy: str) -> None:
    model = _model()
    save({"model": COPIES[copy](model.state_dict())}, save_dir, model=model)


def _case_load_tp1(load_dir: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A TP=1 model (each KV head once) loaded from the checkpoint at `load_dir`."""
    model = _model(kv_size_multiplier=1).to(dtype)
    load(load_dir, model=model)
    return dict(model.state_dict())


def _case_save_without_model(save_dir: str, copy: str) -> str:
    with pytest.raises(ReplicatedMismatchError) as raised:
        save({"model": COPIES[copy](_model().state_dict())}, save_dir)
    return str(raised.value)


def _case_layouts() -> dict:
    model = _model()
    moved = {key: value.clone() for key, value in model.state_dict().items()}
    assert not any(hasattr(value, "tensor_model_parallel") for value in moved.values())
    return {key: (layout.partition_dim, layout.stride, layout.parts) for key, layout in model_layouts(model).items()}


def _case_torch_save_weights_only(save_dir: str) -> dict:
    """Each rank's state dict saved with torch.save, loaded back with weights_only=True: values and layouts kept."""
    state = _model().state_dict()
    path = os.path.join(save_dir, f"rank{dist.get_rank()}.pt")
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
        assert Layout.of(loaded[key]) == Layout.of(value), key
    return {key: Layout.of(value) for key, value in loaded.items()}


def _case_wrong_copy(save_dir: str) -> str:
    model = _model()
    state = model.state_dict()
    state["embed.weight"] = torch.zeros(VOCAB, HIDDEN)  # a full tensor where this rank's shard belongs
    with pytest.raises(CheckpointArgumentError) as raised:
        save({"model": state}, save_dir, model=model)
    return str(raised.value)


def test_layers_declare_layouts_that_copies_keep(pools):
    """The tied decoder weight has the embedding's layout; the fused and GQA layers their stride and parts."""
    layouts = pools.run(2, 2, _case_layouts)[0]
    assert layouts["decoder.weight"] == layouts["embed.weight"] == (0, 1, None)
    assert layouts["attention.qkv.weight"] == (0, 3, None)
    assert layouts["gqa.weight_qkv"][2] is not None and any(part.replication == 2 for part in layouts["gqa.weight_qkv"][2])
    assert "norm.weight" not in layouts  # a plain layer declares nothing: replicated
    assert layouts["attention.output.bias"] == (None, 1, None)


@pytest.fixture(scope="module")
def reference(pools) -> dict[str, torch.Tensor]:
    return pools.run(1, 1, _case_reference)[0]


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_copied_state_dict_saves_with_the_models_layouts(pools, tmp_path, reference, copy):
    save_dir = str(tmp_path / "saved")
    pools.run(2, 2, _case_save, save_dir, copy)
    dtype = torch.bfloat16 if copy == "bf16" else torch.float32
    merge(save_dir, str(tmp_path / "merged"))
    merged = load_file(os.path.join(tmp_path, "merged", "model.safetensors"))
    assert merged.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(merged[key], value.to(dtype)), key
    reshard(save_dir, str(tmp_path / "tp1"), 1)
    resharded = pools.run(1, 1, _case_load_tp1, str(tmp_path / "tp1"), dtype)[0]
    for key, value in reference.items():
        assert torch.equal(resharded[key], value.to(dtype)), key


@pytest.mark.parametrize("copy", ["itself", "clone"])
def test_without_the_model_a_lost_layout_is_refused(pools, tmp_path, copy):
    messages = pools.run(2, 2, _case_save_without_model, str(tmp_path / "saved"), copy)
    assert all("lost" in message for message in messages)


def test_state_dict_loads_with_weights_only(pools, tmp_path):
    """Column, Row, vocab-parallel, fused and GQA (replicated KV) layers: no Python object rides on a saved tensor."""
    layouts = pools.run(2, 2, _case_torch_save_weights_only, str(tmp_path))
    for rank_layouts in layouts:
        assert rank_layouts["attention.output.weight"] == Layout(1)
        assert rank_layouts["embed.weight"] == Layout(0)
        assert rank_layouts["attention.qkv.weight"] == Layout(0, 3)
        assert any(part.replication == 2 for part in rank_layouts["gqa.weight_qkv"].parts)


def test_a_copy_that_does_not_fit_the_model_is_refused(pools, tmp_path):
    messages = pools.run(2, 2, _case_wrong_copy, str(tmp_path / "wrong"))
    assert all("embed.weight" in message and "shard" in message for message in messages)


def test_layout_from_attributes():
    tensor = torch.zeros(4)
    assert Layout.of(tensor) is None
    tensor.tensor_model_parallel, tensor.partition_dim, tensor.partition_stride = True, 0, 2
    assert Layout.of(tensor) == Layout(0, 2)

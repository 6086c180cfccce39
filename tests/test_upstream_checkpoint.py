"""Checkpoints in upstream NeuronxDistributed's layouts load here, at the saved TP degree or another.

The checkpoints are written in the test as upstream writes them (`torch.save` of each
rank's dict in `tp_rank_XX_pp_rank_00/checkpoint.pt`, or the xser layout: a file of
references plus `.tensors/tensor_N.pt`), from a real TP=2 model of ours. A model loaded
at TP=1, 2 or 4 must compute what the saving model computed and hold exactly the
slices of the full tensors that the saved shards make up.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from models import MLP, expected_shard
from safetensors.torch import load_file
from torch import nn

from neuronx_distributed import parallel_state
from neuronx_distributed.cli import main as nxd
from neuronx_distributed.errors import (
    CheckpointArgumentError,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointShapeError,
    IncompleteCheckpointError,
    ReshardError,
    UnsafeCheckpointError,
    UnsupportedParallelismError,
)
from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear
from neuronx_distributed.parallel_layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, load
from neuronx_distributed.parallel_layers.weight_loading import get_weight_loader

HIDDEN, FFN, VOCAB, Q_HEADS, KV_HEADS, HEAD_DIM, SEED = 16, 32, 24, 8, 4, 2, 4321
SAVED_TP = 2


class UpstreamNet(nn.Module):
    """Embedding -> GQA attention (separate Q/K/V shards) -> Row output -> LayerNorm -> MLP -> fused (stride 3) head."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_size()
        self.q_heads, self.kv_heads = Q_HEADS // tp, KV_HEADS // tp
        self.embed = ParallelEmbedding(VOCAB, hidden)
        self.qkv = GQAQKVColumnParallelLinear(hidden, [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], gather_output=False,
                                              fuse_qkv=False, num_key_value_heads=KV_HEADS)
        self.output = RowParallelLinear(Q_HEADS * HEAD_DIM, hidden, input_is_parallel=True)
        self.norm = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, FFN, parallel=True)
        self.head = ColumnParallelLinear(hidden, 3 * hidden, stride=3, gather_output=True)

    def forward(self, ids):
        x = self.embed(ids)
        q, k, v = self.qkv(x)
        q = q.unflatten(-1, (self.q_heads, HEAD_DIM)).transpose(1, 2)
        k, v = (t.unflatten(-1, (self.kv_heads, HEAD_DIM)).transpose(1, 2) for t in (k, v))
        k, v = (t.repeat_interleave(self.q_heads // self.kv_heads, dim=1) for t in (k, v))
        context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
        x = x + self.output(context)
        return self.head(self.mlp(self.norm(x)))


IDS = torch.tensor([[1, 5, 7, 3, 23, 0], [2, 2, 9, 11, 4, 17]])


def _tp() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


def _rank_folder(root: str, rank: int) -> str:
    return os.path.join(root, f"tp_rank_{rank:02d}_pp_rank_00")


def _case_save_upstream(root: str):
    """Write this rank's checkpoint as upstream's parallel_layers.save does (torch.save layout)."""
    torch.manual_seed(SEED)
    model = UpstreamNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(IDS).sum().backward()
    optimizer.step()
    rank, _ = _tp()
    os.makedirs(_rank_folder(root, rank), exist_ok=True)
    # Upstream's state dicts hold plain tensors (ours carry the sharding attributes, which upstream files lack).
    plain = {key: value.clone() for key, value in model.state_dict().items()}
    state = {"model": plain, "optimizer": optimizer.state_dict(), "epoch": 5, "note": "upstream"}
    torch.save(state, os.path.join(_rank_folder(root, rank), "checkpoint.pt"))
    with torch.no_grad():
        return model(IDS), {key: value.clone() for key, value in model.state_dict().items()}


def _full_tensors(shards_per_rank: list[dict], layouts: dict) -> dict[str, torch.Tensor]:
    """The full tensors that the TP ranks' shards make up (the inverse of `expected_shard`)."""
    full = {}
    world = len(shards_per_rank)
    for key, shard in shards_per_rank[0].items():
        if key not in layouts:
            full[key] = shard
            continue
        dim, stride = layouts[key]
        blocks = [None] * (stride * world)
        for rank, shards in enumerate(shards_per_rank):
            for index, block in enumerate(shards[key].chunk(stride, dim=dim)):
                blocks[rank + index * world] = block
        full[key] = torch.cat(blocks, dim=dim)
    return full


def _case_layouts():
    torch.manual_seed(SEED)
    return {key: (p.partition_dim, p.partition_stride) for key, p in UpstreamNet().state_dict(keep_vars=True).items()
            if getattr(p, "tensor_model_parallel", False)}


def _case_load_and_compare(root: str, full: dict, output: torch.Tensor, **kwargs):
    torch.manual_seed(SEED + 1)  # other weights, overwritten by the load
    model = UpstreamNet()
    rest = load(root, model=model, **kwargs)
    rank, world = _tp()
    for key, param in model.state_dict(keep_vars=True).items():
        assert torch.equal(param.detach(), expected_shard(full[key], param, rank, world)), key
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), output, rtol=1e-5, atol=1e-5)
    return rest


@pytest.fixture(scope="module")
def upstream(pools, tmp_path_factory):
    """A TP=2 upstream checkpoint: (folder, full tensors, the saving model's output)."""
    root = str(tmp_path_factory.mktemp("upstream") / "ckpt")
    results = pools.run(2, SAVED_TP, _case_save_upstream, root)
    layouts = pools.run(2, SAVED_TP, _case_layouts)[0]
    full = _full_tensors([state for _, state in results], layouts)
    assert torch.equal(results[0][0], results[1][0])
    return root, full, results[0][0]


@contextlib.contextmanager
def _fake_torch_xla():
    """torch_xla.utils.serialization.TensorReference importable (for pickling xser references like torch_xla)."""
    names = ["torch_xla", "torch_xla.utils", "torch_xla.utils.serialization"]
    assert not any(name in sys.modules for name in names)

    class TensorReference:
        def __init__(self, tid):
            self.tid = tid

    TensorReference.__module__, TensorReference.__qualname__ = names[-1], "TensorReference"
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[names[-1]].TensorReference = TensorReference
    try:
        yield TensorReference
    finally:
        for name in names:
            del sys.modules[name]


def _to_xser(root: str, out: str) -> None:
    """Rewrite a torch-layout upstream checkpoint in the xser layout (as torch_xla's xser.save writes it)."""
    os.makedirs(out)
    with _fake_torch_xla() as reference:
        for name in sorted(os.listdir(root)):
            state = torch.load(os.path.join(root, name, "checkpoint.pt"), weights_only=True)
            path = os.path.join(out, name)
            os.makedirs(path + ".tensors")
            count = [0]

            def rewrite(value):
                if isinstance(value, torch.Tensor):
                    tid = count[0]
                    count[0] += 1
                    torch.save(value, os.path.join(path + ".tensors", f"tensor_{tid}.pt"))
                    return reference(tid)
                if isinstance(value, dict):
                    return {key: rewrite(item) for key, item in value.items()}
                if isinstance(value, (list, tuple)):
                    return type(value)(rewrite(item) for item in value)
                return value

            torch.save(rewrite(state), path)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_loads_at_any_tp_degree(pools, upstream, world_size):
    root, full, output = upstream
    rests = pools.run(world_size, world_size, _case_load_and_compare, root, full, output,
                      model_key="model", strict=True) if world_size == SAVED_TP else None
    if rests is not None:  # same TP degree: each rank gets its own file's rest, optimizer state included
        assert all(rest["epoch"] == 5 and rest["note"] == "upstream" for rest in rests)
        assert all("model" not in rest and rest["optimizer"]["state"] for rest in rests)
    else:  # another degree: the optimizer state's sharding is unknown, so only the model loads
        model_only = f"{root}-model-only"
        if not os.path.exists(model_only):
            for rank in range(SAVED_TP):
                state = torch.load(os.path.join(_rank_folder(root, rank), "checkpoint.pt"), weights_only=True)
                os.makedirs(_rank_folder(model_only, rank))
                torch.save({"model": state["model"], "epoch": 5}, os.path.join(_rank_folder(model_only, rank), "checkpoint.pt"))
        rests = pools.run(world_size, world_size, _case_load_and_compare, model_only, full, output)
        assert all(rest == {"epoch": 5} for rest in rests)


def _case_optimizer_state_refused_at_another_degree(root: str) -> str:
    torch.manual_seed(SEED)
    with pytest.raises(ReshardError) as raised:
        load(root, model=UpstreamNet())
    return str(raised.value)


def test_state_beside_the_model_loads_only_at_the_saved_degree(pools, upstream):
    messages = pools.run(4, 4, _case_optimizer_state_refused_at_another_degree, upstream[0])
    assert all("optimizer" in message and "TP degree 2" in message for message in messages)


def _case_norm_weight(root: str) -> torch.Tensor:
    torch.manual_seed(SEED)
    model = UpstreamNet()
    load(root, model=model)
    return model.norm.weight.detach().clone()


def test_replicated_tensors_come_from_tp_rank_0(pools, upstream, tmp_path):
    root, full, _ = upstream
    differs = _one_rank_copy(root, str(tmp_path / "differs"))
    path = os.path.join(_rank_folder(differs, 1), "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    state["model"]["norm.weight"] += 1
    torch.save(state, path)
    weights = pools.run(2, 2, _case_norm_weight, differs)
    assert all(torch.equal(weight, full["norm.weight"]) for weight in weights)


def test_xser_layout(pools, upstream, tmp_path):
    root, full, output = upstream
    xser = str(tmp_path / "xser")
    _to_xser(root, xser)
    assert sorted(os.listdir(xser)) == ["tp_rank_00_pp_rank_00", "tp_rank_00_pp_rank_00.tensors",
                                        "tp_rank_01_pp_rank_00", "tp_rank_01_pp_rank_00.tensors"]
    rests = pools.run(2, 2, _case_load_and_compare, xser, full, output, load_xser=True)
    assert all(rest["epoch"] == 5 for rest in rests)
    model_only = str(tmp_path / "xser-model")
    shutil.copytree(xser, model_only)
    for rank in range(SAVED_TP):  # drop the optimizer's references: the model alone loads at TP=4
        path = _rank_folder(model_only, rank)
        with _fake_torch_xla() as reference:
            with torch.serialization.safe_globals([reference]):
                state = torch.load(path, weights_only=True)
            torch.save({"model": state["model"]}, path)
    pools.run(4, 4, _case_load_and_compare, model_only, full, output)
    name, message = pools.run(1, 1, _case_load_error, root, load_xser=True)[0]
    assert name is CheckpointNotFoundError and "holds the torch layout" in message, message


def test_upstream_keyword_arguments(pools, upstream, tmp_path):
    root, full, output = upstream
    pools.run(2, 2, _case_load_and_compare, root, full, output, weights_only=True)
    pools.run(2, 2, _case_model_or_optimizer, root, full, output)
    torch.manual_seed(SEED)
    with pytest.raises(CheckpointArgumentError, match="weights-only"):
        load(root, model=nn.Linear(2, 2), weights_only=False)
    with pytest.raises(CheckpointArgumentError, match="not both"):
        load(root, model=nn.Linear(2, 2), model_or_optimizer=nn.Linear(2, 2))


def _case_model_or_optimizer(root: str, full: dict, output: torch.Tensor):
    torch.manual_seed(SEED + 1)
    model = UpstreamNet()
    rest = load(root, model_or_optimizer=model)
    assert rest["epoch"] == 5
    rank, world = _tp()
    for key, param in model.state_dict(keep_vars=True).items():
        assert torch.equal(param.detach(), expected_shard(full[key], param, rank, world)), key
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rest = load(root, model_or_optimizer=optimizer, model_key="optimizer")
    assert rest["epoch"] == 5 and "optimizer" not in rest
    saved = torch.load(os.path.join(_rank_folder(root, rank), "checkpoint.pt"), weights_only=True)["optimizer"]
    for index, param in enumerate(model.parameters()):
        assert torch.equal(optimizer.state[param]["momentum_buffer"], saved["state"][index]["momentum_buffer"])


def test_sharded_false_returns_the_rest_of_the_file(pools, upstream, tmp_path):
    root, full, output = upstream
    path = str(tmp_path / "full.pt")
    torch.save({"model": full, "epoch": 9, "loss": torch.tensor(0.5)}, path)
    rests = pools.run(2, 2, _case_load_and_compare, path, full, output, sharded=False)
    assert all(rest["epoch"] == 9 and torch.equal(rest["loss"], torch.tensor(0.5)) and "model" not in rest for rest in rests)
    torch.save(full, str(tmp_path / "bare.pt"))
    assert pools.run(1, 1, _case_load_and_compare, str(tmp_path / "bare.pt"), full, output, sharded=False) == [None]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _one_rank_copy(root: str, out: str) -> str:
    shutil.copytree(root, out)
    return out


def _case_load_error(root: str, **kwargs) -> tuple[type | None, str]:
    torch.manual_seed(SEED)
    try:
        load(root, model=UpstreamNet(), **kwargs)
    except Exception as error:  # noqa: BLE001 - the type is what the test checks
        return type(error), str(error)
    return None, ""


def test_hostile_pickle_refused(pools, upstream, tmp_path):
    root = upstream[0]
    evil = _one_rank_copy(root, str(tmp_path / "evil"))
    with open(os.path.join(_rank_folder(evil, 1), "checkpoint.pt"), "wb") as file:
        pickle.dump({"model": _Evil()}, file)
    results = pools.run(2, 2, _case_load_error, evil)
    assert results[1][0] is UnsafeCheckpointError and "arbitrary code" in results[1][1]
    assert results[0][0] is UnsafeCheckpointError  # every rank raises, naming the failed one
    xser = str(tmp_path / "xser")
    _to_xser(root, xser)
    torch.save(_Evil(), os.path.join(xser, "tp_rank_00_pp_rank_00.tensors", "tensor_0.pt"))
    assert {kind for kind, _ in pools.run(2, 2, _case_load_error, xser)} == {UnsafeCheckpointError}


def test_bad_folders_raise_typed_errors(pools, upstream, tmp_path):
    root, full, output = upstream
    missing = _one_rank_copy(root, str(tmp_path / "missing"))
    os.rename(_rank_folder(missing, 1), _rank_folder(missing, 2))
    name, message = pools.run(1, 1, _case_load_error, missing)[0]
    assert name is CheckpointNotFoundError and "TP ranks [1]" in message, message
    pipeline = _one_rank_copy(root, str(tmp_path / "pipeline"))
    shutil.copytree(_rank_folder(pipeline, 0), os.path.join(pipeline, "tp_rank_00_pp_rank_01"))
    assert pools.run(1, 1, _case_load_error, pipeline)[0][0] is UnsupportedParallelismError
    mixed = _one_rank_copy(root, str(tmp_path / "mixed"))
    with open(os.path.join(_rank_folder(mixed, 1), "checkpoint.pt"), "wb") as file:
        torch.save({"model": {key: value[:1] for key, value in full.items()}}, file)
    kind, message = pools.run(2, 2, _case_load_error, mixed)[0]
    assert kind is CheckpointCorruptError and "do not belong to one checkpoint" in message, (kind, message)
    name, message = pools.run(1, 1, _case_load_error, root, weights_only=False)[0]
    assert name is CheckpointArgumentError
    small = pools.run(1, 1, _case_wrong_model, root)[0]
    assert small[0] is CheckpointShapeError, small


def _case_wrong_model(root: str) -> tuple[type | None, str]:
    torch.manual_seed(SEED)
    try:
        load(root, model=UpstreamNet(hidden=2 * HIDDEN), model_key="model", strict=False)
    except Exception as error:  # noqa: BLE001
        return type(error), str(error)
    return None, ""


def test_trainer_layout_needs_its_done_marker(pools, upstream, tmp_path):
    root, full, output = upstream
    tag = tmp_path / "trainer" / "step_10"
    (tag / "model").mkdir(parents=True)
    for rank in range(SAVED_TP):
        state = torch.load(os.path.join(_rank_folder(root, rank), "checkpoint.pt"), weights_only=True)
        torch.save(state["model"], tag / "model" / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_00.pt")
    (tag / "checkpoint").write_text("1")
    assert pools.run(1, 1, _case_load_error, str(tag), model_key=None)[0][0] is IncompleteCheckpointError
    (tag / "done").write_text("1")
    pools.run(4, 4, _case_load_and_compare, str(tag), full, output, model_key=None)
    pools.run(2, 2, _case_load_and_compare, str(tag / "model"), full, output, model_key=None)


LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=64)


def _llama(seed: int = SEED):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))


def _case_save_upstream_llama(root: str):
    from neuronx_distributed import parallelize

    model = parallelize(_llama())
    rank, _ = _tp()
    os.makedirs(_rank_folder(root, rank))
    plain = {key: value.clone() for key, value in model.state_dict().items()}
    torch.save({"model": plain, "step": 3}, os.path.join(_rank_folder(root, rank), "checkpoint.pt"))


def _case_load_llama(folder: str, full: dict):
    from neuronx_distributed import parallelize

    model = parallelize(_llama(SEED + 1))
    rest = load(folder, model=model)
    rank, world = _tp()
    for key, param in model.state_dict(keep_vars=True).items():
        loader = get_weight_loader(param)
        expected = loader(list(full[key].shape), lambda dim, start, stop: full[key].narrow(dim, start, stop - start)) \
            if loader is not None else expected_shard(full[key], param, rank, world)
        assert torch.equal(param.detach(), expected), key
    return rest


@pytest.fixture(scope="module")
def llama_upstream(pools, tmp_path_factory):
    """A tiny Llama parallelized at TP=2, saved in upstream's layout: (folder, full state dict)."""
    root = str(tmp_path_factory.mktemp("llama") / "upstream")
    pools.run(2, 2, _case_save_upstream_llama, root)
    return root, _llama().state_dict()


def test_convert_then_load_and_from_pretrained(pools, llama_upstream, tmp_path, capsys):
    import transformers

    config = tmp_path / "config"
    transformers.LlamaConfig(**LLAMA).save_pretrained(config)
    (root, full), ours, hf = llama_upstream, str(tmp_path / "ours"), str(tmp_path / "hf")
    assert nxd(["checkpoint", "convert", root, ours]) == 2
    assert "--config" in capsys.readouterr().err and not os.path.exists(ours)
    assert nxd(["checkpoint", "convert", root, ours, "--config", str(config)]) == 0
    assert "convert" in capsys.readouterr().err  # the progress bar
    with open(os.path.join(ours, "manifest.json")) as file:
        manifest = json.load(file)
    assert manifest["tensor_parallel_size"] == 2
    assert manifest["tensors"]["model/model.layers.0.mlp.down_proj.weight"]["partition_dim"] == 1
    # Written through the save plan: the replicated norms once, in TP rank 0's file; the shards in each rank's.
    stored = [load_file(os.path.join(ours, entry["path"])).keys() for entry in manifest["files"]]
    norms = [name for name in manifest["tensors"] if name.endswith("norm.weight")]
    assert len(norms) == 5 and all(manifest["tensors"][name]["file"] == 0 for name in norms)
    assert all(name in stored[0] and name not in stored[1] for name in norms)
    assert all("model/model.layers.0.mlp.down_proj.weight" in names for names in stored)
    assert "file" not in manifest["tensors"]["model/model.layers.0.mlp.down_proj.weight"]
    for world in (1, 2, 4):  # TP=4: the 2 KV heads are replicated, resharded through the logical tensor
        assert pools.run(world, world, _case_load_llama, ours, full)[0] == {"step": 3}
    pools.run(4, 4, _case_load_llama, root, full)  # the upstream folder directly, into a parallelized model
    assert nxd(["checkpoint", "convert", root, hf, "--to", "hf", "--config", str(config / "config.json")]) == 0
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".nxd-convert-")]
    loaded = transformers.LlamaForCausalLM.from_pretrained(hf).state_dict()
    assert loaded.keys() == full.keys()
    for key, value in full.items():
        assert torch.equal(loaded[key], value), key
    assert load_file(os.path.join(hf, "model.safetensors")).keys() == full.keys()


def test_convert_refuses_a_layout_that_does_not_fit(llama_upstream, tmp_path, capsys):
    import transformers

    config = tmp_path / "config"
    transformers.LlamaConfig(**{**LLAMA, "intermediate_size": 128}).save_pretrained(config)
    transformers.LlamaConfig(**LLAMA).save_pretrained(tmp_path / "llama")
    root = llama_upstream[0]
    assert nxd(["checkpoint", "convert", root, str(tmp_path / "ours"), "--config", str(config)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: 'model.layers.0.mlp.gate_proj.weight' is (32, 32) on TP rank 0"), message
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64).save_pretrained(gpt2)
    assert nxd(["checkpoint", "convert", root, str(tmp_path / "ours"), "--config", str(gpt2)]) == 2
    assert "no model that --config" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ours")
    differs = _one_rank_copy(root, str(tmp_path / "differs"))  # a replicated norm that is not the same on each rank
    path = os.path.join(_rank_folder(differs, 1), "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    state["model"]["model.norm.weight"] += 1
    torch.save(state, path)
    assert nxd(["checkpoint", "convert", differs, str(tmp_path / "ours"), "--config", str(config.parent / "llama")]) == 2
    assert "model/model.norm.weight" in capsys.readouterr().err and not os.path.exists(tmp_path / "ours")
    lacking = _one_rank_copy(root, str(tmp_path / "lacking"))  # TP rank 1's file without a replicated norm
    path = os.path.join(_rank_folder(lacking, 1), "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    del state["model"]["model.norm.weight"]
    torch.save(state, path)
    assert nxd(["checkpoint", "convert", lacking, str(tmp_path / "ours"), "--config", str(config.parent / "llama")]) == 2
    message = capsys.readouterr().err
    assert "TP rank 1's file lacks the model's ['model/model.norm.weight']" in message
    assert not os.path.exists(tmp_path / "ours")

"""The trainer API at TP=2 x DP=2: config checks, training equal to the manual path, and tagged checkpoints.

A model trained through `initialize_parallel_model` / `initialize_parallel_optimizer`
must equal, step by step and bit for bit, the same model trained by hand (parallel
layers, DP gradient all-reduce, TP-aware clipping, AdamW; or NeuronZero1Optimizer used
directly). Checkpoints: `num_kept_ckpts` keeps the newest tags, an async save holds
the state of the call, a save that fails on one rank leaves the previous tag the
newest, a resumed run continues bit for bit, a ZeRO-1 tag saved at DP=2 resumes at DP=4
and DP=1 as the uninterrupted plain run continues, and a checkpoint of another model
raises a typed error and changes nothing.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from models import MLP, expected_shard
from safetensors import safe_open

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import (
    CheckpointArgumentError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    NeuronxDistributedError,
    OptimizerConfigError,
    TrainerConfigError,
    UnsafeCheckpointError,
    UnsupportedParallelismError,
)
from neuronx_distributed.optimizer import NeuronZero1Optimizer
from neuronx_distributed.parallel_layers import all_reduce_gradients, checkpoint_format, clip_grad_norm
from neuronx_distributed.trainer import (
    NxDModel,
    NxDOptimizer,
    finalize_checkpoint,
    has_checkpoint,
    initialize_parallel_model,
    initialize_parallel_optimizer,
    load_checkpoint,
    neuronx_distributed_config,
    save_checkpoint,
)

HIDDEN, FFN, BATCH, SEED, LR, MAX_NORM = 8, 16, 4, 7, 1e-2, 0.05


def _mlp(ffn: int = FFN, seed: int = SEED) -> MLP:
    torch.manual_seed(seed)
    return MLP(HIDDEN, ffn, parallel=True)


def _batch(step: int):
    """This DP rank's rows of step `step`'s global batch."""
    generator = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, HIDDEN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    return x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank]


def _train(model, optimizer, scheduler, steps, manual: bool = False) -> list:
    """Train `steps` steps; return each step's grad norm."""
    norms = []
    for step in steps:
        x, y = _batch(step)
        F.mse_loss(model(x), y).backward()
        if manual:
            all_reduce_gradients(model.parameters())
            norms.append(clip_grad_norm(model.parameters(), MAX_NORM))
        optimizer.step()
        if not manual:
            norms.append(optimizer.grad_norm)
        optimizer.zero_grad()
        scheduler.step()
    return norms


def _schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def _config(zero1: bool) -> dict:
    return neuronx_distributed_config(
        tensor_parallel_size=parallel_state.get_tensor_model_parallel_size(),
        optimizer_config={"zero_one_enabled": zero1, "max_grad_norm": MAX_NORM},
    )


def _trainer_run(zero1: bool, seed: int = SEED, ffn: int = FFN):
    config = _config(zero1)
    model = initialize_parallel_model(config, _mlp, False, ffn, seed)
    optimizer = initialize_parallel_optimizer(config, torch.optim.AdamW, model.parameters(), lr=LR)
    return model, optimizer, _schedule(optimizer)


def _params(model) -> dict:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- config


def test_config_defaults_and_bad_keys():
    config = neuronx_distributed_config(tensor_parallel_size=2, optimizer_config={"zero_one_enabled": True})
    assert config["optimizer_config"] == {"zero_one_enabled": True, "grad_clipping": True, "max_grad_norm": 1.0}
    assert config["mixed_precision_config"] == {
        "use_master_weights": True, "use_fp32_grad_acc": True, "use_master_weights_in_ckpt": False,
    }
    assert config["model_init_config"] == {"sequential_move_factor": 11, "meta_device_init": False, "param_init_fn": None}
    assert config["tensor_parallel_size"] == 2 and config["sequence_parallel"] is False
    neuronx_distributed_config(lnc_size=2, sequential_move_factor=4, activation_checkpoint_config="full")
    bad = [
        (dict(tensor_parallel_degree=2), TrainerConfigError, "unknown argument"),
        (dict(optimizer_config={"zero1": True}), TrainerConfigError, r"unknown key\(s\) \['zero1'\]"),
        (dict(optimizer_config={"max_grad_norm": -1}), TrainerConfigError, "positive number"),
        (dict(optimizer_config={"grad_clipping": "yes"}), TrainerConfigError, "True or False"),
        (dict(tensor_parallel_size=0), TrainerConfigError, "positive int"),
        (dict(pipeline_parallel_size=2), UnsupportedParallelismError, "pass 1"),
        (dict(mixed_precision_config={"use_master_weights": True}), TrainerConfigError, "need ZeRO-1"),
        (dict(mixed_precision_config={"fp8": True}), TrainerConfigError, "unknown key"),
        (dict(model_init_config={"meta_device_init": True}), TrainerConfigError, "needs param_init_fn"),
        (dict(activation_checkpoint_config=[int]), TrainerConfigError, "torch.nn.Module subclass"),
        (dict(pad_model=True), TrainerConfigError, "pad_model"),
        (dict(lora_config=object()), TrainerConfigError, "LoRA"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            neuronx_distributed_config(**kwargs)
    with pytest.raises(TrainerConfigError, match="neuronx_distributed_config"):
        initialize_parallel_optimizer({"tensor_parallel_size": 1}, torch.optim.SGD, [])
    with pytest.raises(OptimizerConfigError, match="torch.optim.Optimizer subclass"):
        initialize_parallel_optimizer(neuronx_distributed_config(), dict, [])


# ---------------------------------------------------------------- training


def _case_trainer_equals_manual(zero1: bool):
    model, optimizer, scheduler = _trainer_run(zero1)
    assert isinstance(model, NxDModel) and isinstance(optimizer, NxDOptimizer)
    assert isinstance(optimizer.optimizer, NeuronZero1Optimizer) == zero1
    manual = _mlp()
    if zero1:
        manual_optimizer = NeuronZero1Optimizer(manual.parameters(), torch.optim.AdamW, max_norm=MAX_NORM, lr=LR)
    else:
        manual_optimizer = torch.optim.AdamW(manual.parameters(), lr=LR)
    manual_scheduler = _schedule(manual_optimizer)
    assert _same(_params(model), _params(manual))
    for step in range(3):
        norm = _train(model, optimizer, scheduler, [step])[0]
        if zero1:
            manual_norm = _train(manual, manual_optimizer, manual_scheduler, [step])[0]
        else:
            manual_norm = _train(manual, manual_optimizer, manual_scheduler, [step], manual=True)[0]
        assert torch.equal(norm, manual_norm)
        assert norm > MAX_NORM  # clipping took part
        assert _same(_params(model), _params(manual)), step
    assert optimizer.param_groups[0]["lr"] == manual_optimizer.param_groups[0]["lr"] == LR / 4
    return parallel_state.get_tensor_model_parallel_rank()


@pytest.mark.parametrize("zero1", [False, True], ids=["plain", "zero1"])
def test_trainer_training_equals_manual_path(pools, zero1):
    assert pools.run(4, 2, _case_trainer_equals_manual, zero1) == [0, 1, 0, 1]


# ---------------------------------------------------------------- checkpoints


def _case_keep_resume_async(folder: str, zero1: bool):
    model, optimizer, scheduler = _trainer_run(zero1)
    assert not has_checkpoint(folder)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint record"):
        load_checkpoint(folder, model=model)
    for step in range(3):
        _train(model, optimizer, scheduler, [step])
        save_checkpoint(folder, f"step_{step}", model=model, optimizer=optimizer, scheduler=scheduler,
                        user_content={"step": step, "pair": (1, 2.5)}, num_kept_ckpts=2)
    assert sorted(n for n in os.listdir(folder)) == ["newest", "step_1", "step_2"]
    with open(os.path.join(folder, "newest")) as file:
        assert json.load(file)["tags"] == ["step_1", "step_2"]
    assert has_checkpoint(folder)
    with pytest.raises(CheckpointArgumentError, match="already exists"):
        save_checkpoint(folder, "step_2", model=model)
    expected_lr = optimizer.param_groups[0]["lr"]
    _train(model, optimizer, scheduler, [3, 4])
    expected = _params(model)

    # Resume from the newest tag into a model built from another seed: the same steps give the same parameters.
    resumed, resumed_optimizer, resumed_scheduler = _trainer_run(zero1, seed=SEED + 5)
    content = load_checkpoint(folder, model=resumed, optimizer=resumed_optimizer, scheduler=resumed_scheduler)
    assert content == {"step": 2, "pair": (1, 2.5)}
    assert resumed_optimizer.param_groups[0]["lr"] == expected_lr
    _train(resumed, resumed_optimizer, resumed_scheduler, [3, 4])
    assert _same(_params(resumed), expected)

    # Async: the save holds the state of the call, whatever training does before finalize.
    at_save = _params(resumed)
    save_checkpoint(folder, "async", model=resumed, optimizer=resumed_optimizer, async_save=True)
    _train(resumed, resumed_optimizer, resumed_scheduler, [5])
    assert not _same(_params(resumed), at_save)
    finalize_checkpoint()
    fresh = _trainer_run(zero1, seed=SEED + 6)[0]
    assert load_checkpoint(folder, model=fresh) is None
    assert _same(_params(fresh), at_save)
    with open(os.path.join(folder, "newest")) as file:
        assert json.load(file)["newest"] == "async"
    return parallel_state.get_tensor_model_parallel_rank()


@pytest.mark.parametrize("zero1", [False, True], ids=["plain", "zero1"])
def test_checkpoints_keep_newest_resume_exactly_and_save_async(pools, tmp_path, zero1):
    assert pools.run(4, 2, _case_keep_resume_async, str(tmp_path / "ckpt"), zero1) == [0, 1, 0, 1]


def _failing_write_on_rank_1(monkeypatch):
    real = checkpoint_format.write_shard_file

    def write(*args, **kwargs):
        if torch.distributed.get_rank() == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_format, "write_shard_file", write)


def _raise_runtime_error():
    raise RuntimeError("scheduler broke")


def _case_failed_saves_keep_previous(folder: str):
    model, optimizer, scheduler = _trainer_run(False)
    save_checkpoint(folder, "good", model=model, optimizer=optimizer, scheduler=scheduler)
    saved = _params(model)
    _train(model, optimizer, scheduler, [0])
    with pytest.MonkeyPatch.context() as monkeypatch:
        _failing_write_on_rank_1(monkeypatch)
        with pytest.raises(CheckpointSaveError, match="No space left|rank 1"):
            save_checkpoint(folder, "bad", model=model, optimizer=optimizer)
        save_checkpoint(folder, "bad_async", model=model, optimizer=optimizer, async_save=True)
        with pytest.raises(CheckpointSaveError, match="No space left|rank 1"):
            finalize_checkpoint()
    assert sorted(os.listdir(folder)) == ["good", "newest"]
    # A killed save leaves its staging folder; nothing reads it, and the next save removes it.
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        os.makedirs(os.path.join(folder, ".saving-killed-0123", "model"))
    torch.distributed.barrier()
    assert has_checkpoint(folder)
    fresh = _trainer_run(False, seed=SEED + 1)[0]
    load_checkpoint(folder, model=fresh)
    assert _same(_params(fresh), saved)
    with pytest.raises(UnsafeCheckpointError, match="holds tensors"):
        save_checkpoint(folder, "tensor_content", model=model, user_content={"w": torch.ones(2)})
    with pytest.MonkeyPatch.context() as monkeypatch:  # a scheduler failing on rank 0 fails the save everywhere
        monkeypatch.setattr(scheduler, "state_dict", _raise_runtime_error)
        with pytest.raises(CheckpointSaveError, match="writing the checkpoint.*scheduler broke"):
            save_checkpoint(folder, "broken_scheduler", model=model, scheduler=scheduler)
    save_checkpoint(folder, "next", model=model)
    assert sorted(os.listdir(folder)) == ["good", "newest", "next"]
    return parallel_state.get_tensor_model_parallel_rank()


def test_failed_or_killed_saves_leave_the_previous_tag_newest(pools, tmp_path):
    assert pools.run(4, 2, _case_failed_saves_keep_previous, str(tmp_path / "ckpt")) == [0, 1, 0, 1]


def _case_zero1_save_at_dp2(folder: str):
    model, optimizer, scheduler = _trainer_run(True)
    _train(model, optimizer, scheduler, range(3))
    save_checkpoint(folder, "dp2", model=model, optimizer=optimizer, scheduler=scheduler, user_content={"step": 2})
    return parallel_state.get_data_parallel_rank()


def _case_zero1_resume_at_other_dp(folder: str):
    """Resume the DP=2 ZeRO-1 tag here; the continued run must equal an uninterrupted plain run."""
    plain, plain_optimizer, plain_scheduler = _trainer_run(False)
    plain_norms = _train(plain, plain_optimizer, plain_scheduler, range(5))
    bigger, bigger_optimizer, bigger_scheduler = _trainer_run(True, ffn=2 * FFN)
    _train(bigger, bigger_optimizer, bigger_scheduler, [0])
    before = _params(bigger), _state_tensors(bigger_optimizer)
    with pytest.raises(NeuronxDistributedError, match="does not fit|shape"):
        load_checkpoint(folder, model=bigger, optimizer=bigger_optimizer)
    with pytest.raises(NeuronxDistributedError, match="does not fit"):
        load_checkpoint(folder, optimizer=bigger_optimizer)
    assert _same(_params(bigger), before[0]) and _same(_state_tensors(bigger_optimizer), before[1])

    model, optimizer, scheduler = _trainer_run(True, seed=SEED + 5)
    assert load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler) == {"step": 2}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 4)  # the scheduler at step 3
    norms = _train(model, optimizer, scheduler, [3, 4])
    for norm, plain_norm in zip(norms, plain_norms[3:]):
        torch.testing.assert_close(norm, plain_norm, rtol=1e-5, atol=1e-6)
    for name, param in _params(model).items():
        torch.testing.assert_close(param, _params(plain)[name], rtol=1e-5, atol=1e-6, msg=name)
    return parallel_state.get_data_parallel_rank()


def _state_tensors(optimizer) -> dict:
    """Every tensor of a ZeRO-1 optimizer's state_dict (moments, step counters, master chunks), by a flat key."""
    state = optimizer.state_dict()
    tensors = {f"{index}/{key}": value.clone() for index, values in state["state"].items() for key, value in values.items()}
    return {**tensors, **{f"master/{i}": m for i, m in enumerate(state["master_weights"])}}


def test_zero1_checkpoint_resumes_at_another_dp_size(pools, tmp_path):
    """A ZeRO-1 tag saved at TP=1 x DP=2 resumes at DP=4 and at DP=1 (each rank cuts its chunks from the partitions)."""
    folder = str(tmp_path / "ckpt")
    assert pools.run(2, 1, _case_zero1_save_at_dp2, folder) == [0, 1]
    assert pools.run(4, 1, _case_zero1_resume_at_other_dp, folder) == [0, 1, 2, 3]
    assert pools.run(1, 1, _case_zero1_resume_at_other_dp, folder) == [0]


def _case_save_plain_and_zero1_tags(folder: str):
    """Save a plain and a ZeRO-1 tag after two steps; return this rank's parameters of the plain tag (TP rank,
    name -> (shard, partition dim or None))."""
    for zero1 in (True, False):
        model, optimizer, scheduler = _trainer_run(zero1)
        _train(model, optimizer, scheduler, range(2))
        save_checkpoint(folder, "zero1" if zero1 else "plain", model=model, optimizer=optimizer)
    shards = {name: (param.detach().clone(), param.partition_dim if getattr(param, "tensor_model_parallel", False)
                     else None) for name, param in model.named_parameters()}
    return parallel_state.get_tensor_model_parallel_rank(), shards


def _case_model_at_another_size(folder: str, full: dict):
    model = _trainer_run(False, seed=SEED + 3)[0]
    assert load_checkpoint(folder, tag="plain", model=model) is None
    rank, world = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), expected_shard(full[name], param, rank, world)), name
    return rank


def _stored_names(folder: str) -> list[set]:
    """The tensor names in each TP rank's shard file of a sharded folder, and its manifest's tensor entries."""
    with open(os.path.join(folder, "manifest.json")) as file:
        manifest = json.load(file)
    names = []
    for entry in manifest["files"]:
        with safe_open(os.path.join(folder, entry["path"]), "pt") as shard:
            names.append(set(shard.keys()))
    return names, manifest["tensors"]


def test_tags_store_replicated_tensors_once_and_load_at_another_size(pools, tmp_path):
    """The model folder follows parallel_layers.save's plan (fc2.bias, replicated, only in TP rank 0's file), and
    so does optimizer state that is the same on every TP rank; the model loads at TP=1 x DP=2 and TP=4."""
    folder = str(tmp_path / "ckpt")
    results = pools.run(4, 2, _case_save_plain_and_zero1_tags, folder)
    shards = [dict(results[0][1]), dict(results[1][1])]  # TP ranks 0 and 1 (of DP rank 0)
    assert [rank for rank, _ in results] == [0, 1, 0, 1]

    for tag in ("plain", "zero1"):
        files, entries = _stored_names(os.path.join(folder, tag, "model"))
        assert entries["fc2.bias"]["file"] == 0 and "file" not in entries["fc1.weight"]
        assert "fc2.bias" in files[0] and "fc2.bias" not in files[1]
        assert all({"fc1.weight", "fc1.bias", "fc2.weight"} <= names for names in files)
    files, entries = _stored_names(os.path.join(folder, "plain", "optim"))
    moments = [f"optimizer/state/{index}/{key}" for index in (3,) for key in ("exp_avg", "exp_avg_sq")]
    assert all(entries[name]["file"] == 0 and name in files[0] and name not in files[1] for name in moments)
    assert "file" not in entries["optimizer/state/0/exp_avg"] and "optimizer/state/0/exp_avg" in files[1]
    for dp_rank in (0, 1):  # ZeRO-1: fc2.bias's chunk is the same on both TP ranks of each DP rank
        files, entries = _stored_names(os.path.join(folder, "zero1", "optim", f"dp_rank_{dp_rank:02d}"))
        assert entries["optimizer/state/3/exp_avg"]["file"] == 0 and "optimizer/state/3/exp_avg" not in files[1]

    full = {name: shard if dim is None else torch.cat([shards[0][name][0], shards[1][name][0]], dim=dim)
            for name, (shard, dim) in shards[0].items()}
    assert pools.run(2, 1, _case_model_at_another_size, folder, full) == [0, 0]
    assert pools.run(4, 4, _case_model_at_another_size, folder, full) == [0, 1, 2, 3]


def _case_other_model_changes_nothing(folder: str):
    model, optimizer, scheduler = _trainer_run(False)
    _train(model, optimizer, scheduler, [0])
    save_checkpoint(folder, "t", model=model, optimizer=optimizer, scheduler=scheduler)
    other, other_optimizer, other_scheduler = _trainer_run(False, ffn=2 * FFN)
    _train(other, other_optimizer, other_scheduler, [0])
    before = (_params(other), other_optimizer.state_dict()["state"][0]["exp_avg"].clone(), other_scheduler.state_dict())
    for kwargs in (dict(model=other, optimizer=other_optimizer, scheduler=other_scheduler), dict(model=other)):
        with pytest.raises(NeuronxDistributedError, match="does not fit|shape"):
            load_checkpoint(folder, **kwargs)
        assert _same(_params(other), before[0])
        assert torch.equal(other_optimizer.state_dict()["state"][0]["exp_avg"], before[1])
        assert other_scheduler.state_dict() == before[2]
    zero1_model, zero1_optimizer, _ = _trainer_run(True)
    with pytest.raises(CheckpointArgumentError, match="plain optimizer state"):
        load_checkpoint(folder, model=zero1_model, optimizer=zero1_optimizer)
    with pytest.raises(CheckpointArgumentError, match="cannot name"):
        save_checkpoint(folder, "../escape", model=model)
    return parallel_state.get_tensor_model_parallel_rank()


def test_loading_another_models_checkpoint_raises_and_changes_nothing(pools, tmp_path):
    assert pools.run(4, 2, _case_other_model_changes_nothing, str(tmp_path / "ckpt")) == [0, 1, 0, 1]


def _two_mlps() -> torch.nn.Module:
    return torch.nn.Sequential(_mlp(), MLP(HIDDEN, FFN, parallel=True))


def _fill(module: torch.nn.Module) -> None:
    for param in module.parameters(recurse=False):
        param.data.fill_(0.5 if param.dim() == 1 else 0.01)


def _case_model_init_options():
    from neuronx_distributed.utils.activation_checkpoint import CheckpointWrapper

    config = neuronx_distributed_config(tensor_parallel_size=2, activation_checkpoint_config=MLP)
    checkpointed = initialize_parallel_model(config, _two_mlps)
    plain = initialize_parallel_model(neuronx_distributed_config(tensor_parallel_size=2), _two_mlps)
    assert [type(m) for m in checkpointed.module] == [CheckpointWrapper] * 2
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    for model in (checkpointed, plain):
        x, y = _batch(0)
        F.mse_loss(model(x), y).backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(checkpointed.parameters(), plain.parameters()))

    meta = neuronx_distributed_config(
        tensor_parallel_size=2, model_init_config={"meta_device_init": True, "param_init_fn": _fill}
    )
    model = initialize_parallel_model(meta, _mlp)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.module.fc1.weight.tensor_model_parallel and model.module.fc1.weight.partition_dim == 0
    assert torch.equal(model.module.fc2.bias, torch.full((HIDDEN,), 0.5))
    return parallel_state.get_tensor_model_parallel_rank()


def test_initialize_parallel_model_checkpointing_and_meta_init(pools):
    assert pools.run(2, 2, _case_model_init_options) == [0, 1]

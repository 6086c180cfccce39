"""modules.qkv_linear against the unsharded torch layers: KV heads replicated across TP ranks.

Every sharded layer is compared with the TP=1 torch model built from the same seed:
forward outputs, input gradients, weight gradients (the copies of a head each hold the
sum over the copies, as the tied weight of the unsharded model does), one SGD step and
the forward after it. The expected layout is computed here from the definition (rank r
holds replicated heads r*K .. r*K+K-1, replicated head j being logical head j // m).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import CheckpointCorruptError, LayerConfigError, ReshardError
from neuronx_distributed.parallel_layers import checkpoint_tools, clip_grad_norm, load, save
from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear, ReplicatedKVColumnParallelLinear
from neuronx_distributed.optimizer import NeuronZero1Optimizer

HIDDEN, SEQ, BATCH, LR, MAX_NORM = 8, 4, 2, 0.1, 0.05
TOL = dict(rtol=1e-5, atol=1e-5)


def _replicated_heads(num_heads: int, multiplier: int) -> list[int]:
    """The logical head of each replicated head, in stored order (each head `multiplier` times in a row)."""
    return [head for head in range(num_heads) for _ in range(multiplier)]


def _local_heads(num_heads: int, multiplier: int, rank: int, world: int) -> list[int]:
    per_rank = num_heads * multiplier // world
    return _replicated_heads(num_heads, multiplier)[rank * per_rank:(rank + 1) * per_rank]


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([head * head_dim + d for head in heads for d in range(head_dim)])


def _stored_rows(num_blocks: int, block: int, multiplier: int) -> list[int]:
    """The logical row of each stored row: blocks of `block` rows, each stored `multiplier` times in a row."""
    return [b * block + d for b in _replicated_heads(num_blocks, multiplier) for d in range(block)]


def _local_rows(rows: list[int], rank: int, world: int) -> torch.Tensor:
    per_rank = len(rows) // world
    return torch.tensor(rows[rank * per_rank:(rank + 1) * per_rank])


def _tp():
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


def _input(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=generator).requires_grad_()


def _cotangent(seed: int, width: int) -> torch.Tensor:
    """The same random [SEQ, BATCH, width] tensor on every rank (what a downstream layer would send back)."""
    return torch.randn(SEQ, BATCH, width, generator=torch.Generator().manual_seed(seed + 1))


def _check_clipped_norm(layer, reference) -> None:
    """clip_grad_norm counts each replicated head once: the norm (and clipping) of the unsharded model."""
    total = clip_grad_norm(list(layer.parameters()), MAX_NORM)
    expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), MAX_NORM)
    assert expected > MAX_NORM  # the clipping branch runs
    torch.testing.assert_close(total, expected, **TOL)


def _sgd(params) -> None:
    with torch.no_grad():
        for param in params:
            param -= LR * param.grad


def kv_projection_matches_linear(num_heads: int, head_dim: int, multiplier: int, seed: int, bias: bool = True):
    rank, world = _tp()
    torch.manual_seed(seed)
    reference = nn.Linear(HIDDEN, num_heads * head_dim, bias=bias)
    torch.manual_seed(seed)
    layer = ReplicatedKVColumnParallelLinear(HIDDEN, num_heads, head_dim, bias=bias, kv_size_multiplier=multiplier)
    local = _rows(_local_heads(num_heads, multiplier, rank, world), head_dim)
    stored = _rows(_replicated_heads(num_heads, multiplier), head_dim)  # every rank's rows, in rank order
    assert torch.equal(layer.weight, reference.weight[local])
    x, x_ref = _input(seed), _input(seed)
    # Each rank's copy feeds its own downstream computation: the loss sums over every stored copy.
    cotangent = _cotangent(seed, len(stored))
    mine = cotangent[..., rank * len(local):(rank + 1) * len(local)]
    output = layer(x)
    torch.testing.assert_close(output, reference(x_ref)[..., local], **TOL)
    (output * mine).sum().backward()
    (reference(x_ref)[..., stored] * cotangent).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad[local], **TOL)
    if bias:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad[local], **TOL)
    _check_clipped_norm(layer, reference)
    if bias:
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad[local], **TOL)
    _sgd(layer.parameters())
    _sgd(reference.parameters())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x_ref)[..., local], **TOL)


def kv_projection_under_zero1(seed: int):
    """ZeRO-1's grad_norm counts each replicated head once, and its step equals the unsharded one."""
    rank, world = _tp()
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_size()
    heads, head_dim, multiplier = 1, 3, world  # one KV head, a copy on every TP rank
    torch.manual_seed(seed)
    reference = nn.Linear(HIDDEN, heads * head_dim)
    torch.manual_seed(seed)
    layer = ReplicatedKVColumnParallelLinear(HIDDEN, heads, head_dim, kv_size_multiplier=multiplier)
    optimizer = NeuronZero1Optimizer(layer.parameters(), torch.optim.SGD, lr=LR, max_norm=MAX_NORM)
    local = _rows(_local_heads(heads, multiplier, rank, world), head_dim)
    stored = _rows(_replicated_heads(heads, multiplier), head_dim)
    for replica in range(dp):  # the unsharded model sees every replica's batch, averaged
        cotangent = _cotangent(seed + replica, len(stored))
        ((reference(_input(seed + replica))[..., stored] * cotangent).sum() / dp).backward()
    cotangent = _cotangent(seed + dp_rank, len(stored))[..., rank * len(local):(rank + 1) * len(local)]
    (layer(_input(seed + dp_rank)) * cotangent).sum().backward()
    optimizer.step()
    expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), MAX_NORM)
    assert expected > MAX_NORM  # the clipping branch runs
    torch.testing.assert_close(optimizer.grad_norm, expected, **TOL)
    _sgd(reference.parameters())
    torch.testing.assert_close(layer.weight.detach(), reference.weight.detach()[local], **TOL)
    torch.testing.assert_close(layer.bias.detach(), reference.bias.detach()[local], **TOL)


def kv_projection_from_linear(num_heads: int, head_dim: int, multiplier: int):
    rank, world = _tp()
    linear = nn.Linear(HIDDEN, num_heads * head_dim)
    layer = ReplicatedKVColumnParallelLinear.from_linear(linear, num_heads, head_dim, kv_size_multiplier=multiplier)
    local = _rows(_local_heads(num_heads, multiplier, rank, world), head_dim)
    assert torch.equal(layer.weight, linear.weight[local]) and torch.equal(layer.bias, linear.bias[local])
    with torch.device("meta"):
        meta = nn.Linear(HIDDEN, num_heads * head_dim)
    shell = ReplicatedKVColumnParallelLinear.from_linear(meta, num_heads, head_dim, kv_size_multiplier=multiplier)
    assert shell.weight.is_meta and tuple(shell.weight.shape) == (len(local), HIDDEN)


def kv_projection_refused(num_heads: int, multiplier: int) -> str:
    with pytest.raises(LayerConfigError) as refused:
        ReplicatedKVColumnParallelLinear(HIDDEN, num_heads, 4, kv_size_multiplier=multiplier)
    return str(refused.value)


def gqa_refused(output_sizes, **kwargs) -> str:
    with pytest.raises(LayerConfigError) as refused:
        GQAQKVColumnParallelLinear(HIDDEN, output_sizes, **kwargs)
    return str(refused.value)


# (TP size, KV heads, multiplier): every multiplier that fits 2 KV heads at TP 1, 2 and 4.
KV_CASES = [(1, 2, 1), (1, 2, 2), (2, 2, 1), (2, 2, 2), (4, 2, 2), (4, 2, 4), (4, 4, 1)]


def test_replicated_kv_projection_under_zero1(pools):
    pools.run(4, 2, kv_projection_under_zero1, seed=5)


@pytest.mark.parametrize("tp, heads, multiplier", KV_CASES)
def test_replicated_kv_projection_equals_linear(pools, tp, heads, multiplier):
    pools.run(tp, tp, kv_projection_matches_linear, heads, 3, multiplier, seed=tp * 10 + multiplier)
    pools.run(tp, tp, kv_projection_from_linear, heads, 3, multiplier)


def test_replicated_kv_projection_without_bias(pools):
    pools.run(4, 4, kv_projection_matches_linear, 2, 3, 2, seed=5, bias=False)


def test_multiplier_that_does_not_fit_is_refused_on_every_rank(pools):
    messages = pools.run(4, 4, kv_projection_refused, 2, 1)
    assert all("kv_size_multiplier=2" in message for message in messages)
    messages = pools.run(4, 4, kv_projection_refused, 3, 2)
    assert all("kv_size_multiplier=4" in message for message in messages)


def _gqa_reference(q_size: int, kv_size: int, bias: bool, seed: int, **kwargs) -> GQAQKVColumnParallelLinear:
    """The TP=1 layer (its own one-rank group, kv_size_multiplier=1) built from `seed`."""
    single, _ = dist.new_subgroups(1)
    torch.manual_seed(seed)
    return GQAQKVColumnParallelLinear(HIDDEN, [q_size, kv_size], bias=bias, fuse_qkv=False,
                                      tensor_model_parallel_group=single, **kwargs)


class _GQALayout:
    """Which logical rows of Q and of K / V this rank holds (from the definition, not the library)."""

    def __init__(self, q_size, kv_size, block, multiplier, rank, world):
        self.q = torch.arange(rank * q_size // world, (rank + 1) * q_size // world)
        self.kv_stored = _stored_rows(kv_size // block, block, multiplier)
        self.kv = _local_rows(self.kv_stored, rank, world)
        self.rank = rank


def _local_outputs(outputs, layout, gather_output):
    """The reference's (logical) q, k, v as this rank's layer returns them."""
    if gather_output:
        return outputs
    q, k, v = outputs
    return q[..., layout.q], k[..., layout.kv], v[..., layout.kv]


def _loss(outputs, layout, cotangents, gather_output, reference):
    """Sum over ranks of each rank's outputs times its cotangent: every stored copy of K / V feeds its own path."""
    q, k, v = outputs
    cq, ck, cv = cotangents
    if gather_output:
        return (q * cq).sum() + (k * ck).sum() + (v * cv).sum()
    if reference:  # every rank's copies, as the sharded layers together hold them
        stored = torch.tensor(layout.kv_stored)
        return (q * cq).sum() + (k[..., stored] * ck).sum() + (v[..., stored] * cv).sum()
    per_rank = len(layout.q)
    mine = slice(layout.rank * len(layout.kv), (layout.rank + 1) * len(layout.kv))
    return ((q * cq[..., layout.rank * per_rank:(layout.rank + 1) * per_rank]).sum()
            + (k * ck[..., mine]).sum() + (v * cv[..., mine]).sum())


def _weights(layer, fused):
    return layer.weight_qkv.split(
        [layer.q_output_size_per_partition] + [layer.kv_output_size_per_partition] * 2
    ) if fused else (layer.weight_q, layer.weight_k, layer.weight_v)


def _check_weights(layer, reference, layout, fused, grad=False):
    get = (lambda t: t.grad) if grad else (lambda t: t)
    qw, kw, vw = (layer.weight_qkv.grad.split([len(layout.q), len(layout.kv), len(layout.kv)])
                  if fused and grad else _weights(layer, fused) if not grad else
                  (layer.weight_q.grad, layer.weight_k.grad, layer.weight_v.grad))
    if not grad:
        qw, kw, vw = (t.detach() for t in (qw, kw, vw))
    torch.testing.assert_close(qw, get(reference.weight_q)[layout.q], **TOL)
    torch.testing.assert_close(kw, get(reference.weight_k)[layout.kv], **TOL)
    torch.testing.assert_close(vw, get(reference.weight_v)[layout.kv], **TOL)


def gqa_matches_tp1(q_heads, kv_heads, head_dim, multiplier, seed, heads_known=True, sequence_parallel=False):
    """Fused and separate weights, gathered and local outputs, against the TP=1 layer of the same seed."""
    rank, world = _tp()
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    known = dict(num_key_value_heads=kv_heads) if heads_known else {}
    layout = _GQALayout(q_size, kv_size, head_dim if heads_known else kv_size, multiplier, rank, world)
    combinations = [(False, False)] if sequence_parallel else [(f, g) for f in (True, False) for g in (True, False)]
    for fused, gather_output in combinations:
        reference = _gqa_reference(q_size, kv_size, True, seed, **known)
        torch.manual_seed(seed)
        layer = GQAQKVColumnParallelLinear(
            HIDDEN, [q_size, kv_size], gather_output=gather_output, fuse_qkv=fused, kv_size_multiplier=multiplier,
            sequence_parallel_enabled=sequence_parallel, **known,
        )
        _check_weights(layer, reference, layout, fused)
        x, x_ref = _input(seed), _input(seed)
        chunk = SEQ // world if sequence_parallel else SEQ
        x_in = x.detach()[rank * chunk:(rank + 1) * chunk].requires_grad_() if sequence_parallel else x
        widths = (q_size, kv_size, kv_size) if gather_output else (q_size, len(layout.kv_stored), len(layout.kv_stored))
        cotangents = [_cotangent(seed + i, width) for i, width in enumerate(widths)]
        outputs, expected = layer(x_in), reference(x_ref)
        for got, want in zip(outputs, _local_outputs(expected, layout, gather_output)):
            torch.testing.assert_close(got, want, **TOL)
        _loss(outputs, layout, cotangents, gather_output, False).backward()
        _loss(expected, layout, cotangents, gather_output, True).backward()
        want_grad = x_ref.grad[rank * chunk:(rank + 1) * chunk] if sequence_parallel else x_ref.grad
        torch.testing.assert_close(x_in.grad, want_grad, **TOL)
        _check_weights(layer, reference, layout, fused, grad=True)
        _check_clipped_norm(layer, reference)
        _check_weights(layer, reference, layout, fused, grad=True)
        _sgd(layer.parameters())
        _sgd(reference.parameters())
        with torch.no_grad():
            for got, want in zip(layer(x_in), _local_outputs(reference(x_ref), layout, gather_output)):
                torch.testing.assert_close(got, want, **TOL)


# (TP size, multiplier) for 8 query heads and 2 KV heads: every multiplier that fits, and 4 at TP=4.
GQA_CASES = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2), (4, 4)]


@pytest.mark.parametrize("tp, multiplier", GQA_CASES)
def test_gqa_layer_equals_tp1_layer(pools, tp, multiplier):
    pools.run(tp, tp, gqa_matches_tp1, 8, 2, 2, multiplier, seed=tp * 10 + multiplier)


def test_gqa_layer_upstream_layout_and_sequence_parallel(pools):
    """Without head counts the whole KV projection is one replicated block (upstream's layout)."""
    pools.run(4, 4, gqa_matches_tp1, 8, 2, 2, 2, seed=7, heads_known=False)
    pools.run(2, 2, gqa_matches_tp1, 8, 2, 2, 2, seed=8, sequence_parallel=True)


# Checkpoints: 8 query heads, 2 KV heads of size 2; saved at TP=4 with kv_size_multiplier=2.
Q_HEADS, KV_HEADS, HEAD_DIM, SAVED_TP, SAVED_MULTIPLIER = 8, 2, 2, 4, 2
SIZES = [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]


def _gqa(seed, multiplier, fused, gather_output=False):
    torch.manual_seed(seed)
    return GQAQKVColumnParallelLinear(HIDDEN, SIZES, gather_output=gather_output, fuse_qkv=fused,
                                      kv_size_multiplier=multiplier, num_key_value_heads=KV_HEADS)


def _kv(seed, multiplier):
    torch.manual_seed(seed)
    return ReplicatedKVColumnParallelLinear(HIDDEN, KV_HEADS, HEAD_DIM, kv_size_multiplier=multiplier)


def _models(seed, multiplier):
    """Fused and separate GQA layers and a KV projection, in one module."""
    return nn.ModuleDict({"fused": _gqa(seed, multiplier, True), "separate": _gqa(seed, multiplier, False),
                          "kv": _kv(seed, multiplier)})


def _expected_shards(seed, multiplier) -> dict[str, torch.Tensor]:
    """This rank's parameters as the TP=1 layers of `seed` give them, cut by the layout's definition."""
    rank, world = _tp()
    layout = _GQALayout(SIZES[0], SIZES[1], HEAD_DIM, multiplier, rank, world)
    reference = _gqa_reference(*SIZES, True, seed, num_key_value_heads=KV_HEADS)
    single, _ = dist.new_subgroups(1)
    torch.manual_seed(seed)
    kv = ReplicatedKVColumnParallelLinear(HIDDEN, KV_HEADS, HEAD_DIM, tensor_model_parallel_group=single)
    full = {key: getattr(reference, key).detach() for key in ("weight_q", "weight_k", "weight_v", "bias_q", "bias_k", "bias_v")}
    local = {key: value[layout.q if key.endswith("q") else layout.kv] for key, value in full.items()}
    expected = {f"separate.{key}": value for key, value in local.items()}
    for kind in ("weight", "bias"):
        expected[f"fused.{kind}_qkv"] = torch.cat([local[f"{kind}_{key}"] for key in "qkv"])
        expected[f"kv.{kind}"] = getattr(kv, kind).detach()[layout.kv]
    return expected


def _assert_loaded(model, seed, multiplier):
    expected = _expected_shards(seed, multiplier)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def save_replicated(save_dir: str, seed: int):
    save({"model": _models(seed, SAVED_MULTIPLIER).state_dict()}, save_dir)


def load_resharded(save_dir: str, seed: int, multiplier: int):
    """Load the TP=4, multiplier-2 checkpoint at this TP degree into layers with `multiplier`."""
    model = _models(seed + 1, multiplier)
    load(save_dir, model)
    _assert_loaded(model, seed, multiplier)


def save_full_reference(path: str, seed: int):
    """A full, Hugging Face style state dict (separate q/k/v weights) of the TP=1 layers of `seed`."""
    from safetensors.torch import save_file

    reference = _gqa_reference(*SIZES, True, seed, num_key_value_heads=KV_HEADS)
    single, _ = dist.new_subgroups(1)
    torch.manual_seed(seed)
    kv = ReplicatedKVColumnParallelLinear(HIDDEN, KV_HEADS, HEAD_DIM, tensor_model_parallel_group=single)
    full = {f"separate.{key}": value.detach() for key, value in reference.state_dict().items()}
    full.update({f"fused.{key.removeprefix('separate.')}": value.clone() for key, value in full.items()})
    full.update({f"kv.{key}": value.detach() for key, value in kv.state_dict().items()})
    if dist.get_rank() == 0:
        save_file(full, path)
    return {key: value for key, value in full.items() if not key.startswith("fused.")}


def load_full(path: str, seed: int, multiplier: int):
    model = _models(seed + 1, multiplier)
    load(path, model, sharded=False)
    _assert_loaded(model, seed, multiplier)


@pytest.fixture(scope="module")
def replicated_checkpoint(pools, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("gqa") / "tp4")
    pools.run(SAVED_TP, SAVED_TP, save_replicated, save_dir, 11)
    return save_dir


def test_checkpoint_round_trip_and_reshard(pools, replicated_checkpoint):
    """Same TP and multiplier; TP=2 with the copies dropped (m=1) or kept (m=2); TP=1."""
    pools.run(4, 4, load_resharded, replicated_checkpoint, 11, SAVED_MULTIPLIER)
    pools.run(2, 2, load_resharded, replicated_checkpoint, 11, 1)
    pools.run(2, 2, load_resharded, replicated_checkpoint, 11, 2)
    pools.run(1, 1, load_resharded, replicated_checkpoint, 11, 1)


def test_reshard_tool_keeps_the_copies(pools, replicated_checkpoint, tmp_path):
    resharded = str(tmp_path / "tp2")
    checkpoint_tools.reshard(replicated_checkpoint, resharded, 2)
    pools.run(2, 2, load_resharded, resharded, 11, SAVED_MULTIPLIER)
    with pytest.raises(ReshardError, match="split across 3 tensor-parallel ranks"):
        checkpoint_tools.reshard(replicated_checkpoint, str(tmp_path / "tp3"), 3)


def test_merge_writes_each_head_once(pools, replicated_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from neuronx_distributed.cli import main

    out = str(tmp_path / "merged")
    assert main(["checkpoint", "merge", replicated_checkpoint, out]) == 0
    merged = load_file(f"{out}/model.safetensors")
    full = pools.run(1, 1, save_full_reference, str(tmp_path / "full.safetensors"), 11)[0]
    for key, value in full.items():
        assert torch.equal(merged[key], value), key
    for kind in ("weight", "bias"):
        fused = torch.cat([full[f"separate.{kind}_{key}"] for key in "qkv"])
        assert torch.equal(merged[f"fused.{kind}_qkv"], fused)


def test_full_checkpoint_with_separate_qkv_loads_into_replicated_layers(pools, tmp_path):
    path = str(tmp_path / "full.safetensors")
    pools.run(1, 1, save_full_reference, path, 13)
    pools.run(4, 4, load_full, path, 13, 2)
    pools.run(2, 2, load_full, path, 13, 1)


@pytest.mark.parametrize("output_sizes, kwargs, says", [
    ([16, 4], dict(num_key_value_heads=2), "kv_size_multiplier=2"),  # 2 KV heads at TP=4
    ([16, 4], dict(num_key_value_heads=2, kv_size_multiplier=3), "kv_size_multiplier=2"),
    ([16, 6], dict(), "kv_size_multiplier=2"),  # upstream's layout: 6 rows at TP=4
    ([6, 4], dict(kv_size_multiplier=2), "Q size 6"),
    ([16, 4], dict(num_key_value_heads=3), "num_key_value_heads=3"),
    ([16], dict(), "[q_size, kv_size]"),
    ([16, 4], dict(kv_size_multiplier=0), "kv_size_multiplier must be a positive integer"),
    ([16, 4], dict(kv_size_multiplier=2, sequence_parallel_enabled=True), "gather_output=False"),
])
def test_gqa_bad_sizes_refused_on_every_rank(pools, output_sizes, kwargs, says):
    messages = pools.run(4, 4, gqa_refused, output_sizes, **kwargs)
    assert all(says in message for message in messages), messages


def test_manifest_parts_are_checked(replicated_checkpoint, tmp_path):
    """A damaged `parts` entry fails the manifest check, naming the field, before any shard is read."""
    import json
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(replicated_checkpoint, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    entry = manifest["tensors"]["model/kv.weight"]
    assert entry["parts"] == [{"size": KV_HEADS * HEAD_DIM * SAVED_MULTIPLIER, "replication": 2, "block": HEAD_DIM}]
    entry["parts"][0]["replication"] = 3
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorruptError, match=r"tensors\['model/kv.weight'\].parts\[0\] has 8 rows"):
        checkpoint_tools.verify(str(damaged))

"""ZeRO-1 (`optimizer.NeuronZero1Optimizer`) against the unsharded single-process model and torch's optimizers.

The TP model (Column -> GELU -> Row, then a replicated scale) trains on its DP slice of
the batch; the reference (torch.nn twins, same seed) trains on the whole batch with the
plain torch optimizer and `torch.nn.utils.clip_grad_norm_`. After every step each shard
must equal the matching slice of the reference's parameter, and `grad_norm` the norm
that clip_grad_norm_ returned. The collectives of a step are counted.
"""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from models import MLP, expected_shard
from torch import nn

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import ModelParallelNotInitializedError, OptimizerConfigError, OptimizerStateError
from neuronx_distributed.optimizer import NeuronZero1Optimizer
from neuronx_distributed.utils.adamw_fp32_optim_params import AdamW_FP32OptimParams

HIDDEN, FFN, BATCH, STEPS, SEED = 8, 16, 8, 5, 1234
PARAMETERS = 5  # in ScaledMLP: two weights, two biases, the scale
TOL = dict(rtol=1e-5, atol=1e-5)
ZERO1_TOPOLOGIES = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, dict(lr=2e-2, weight_decay=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=5e-2, momentum=0.9, weight_decay=0.01)),
    "adamw_fp32_optim_params": (AdamW_FP32OptimParams, dict(lr=2e-2, weight_decay=0.1)),
}


class ScaledMLP(nn.Module):
    """`MLP` (sharded when `parallel`) followed by a replicated per-feature scale."""

    def __init__(self, parallel: bool):
        super().__init__()
        self.mlp = MLP(HIDDEN, FFN, parallel)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, HIDDEN))

    def forward(self, x):
        return self.mlp(x) * self.scale


def _models(dtype=torch.float32):
    torch.manual_seed(SEED)
    reference = ScaledMLP(parallel=False).to(dtype)
    torch.manual_seed(SEED)
    model = ScaledMLP(parallel=True).to(dtype)
    return reference, model


def _data(step: int):
    generator = torch.Generator().manual_seed(SEED + 100 + step)
    return torch.randn(BATCH, HIDDEN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)


def _local_batch(tensor):
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    return tensor.chunk(dp_size)[dp_rank]


def _loss(model, x, y):
    return F.mse_loss(model(x.to(model.scale.dtype)).float(), y)


def _check_shards(model, reference, **tol):
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = expected_shard(ref_params[name].detach(), param, tp_rank, tp_size)
        torch.testing.assert_close(param.detach(), expected, **(tol or TOL), msg=lambda m, name=name: f"{name}: {m}")


def _expected_step_collectives(on_gloo: str | None = None) -> Counter:
    dp_size, tp_size = parallel_state.get_data_parallel_size(), parallel_state.get_tensor_model_parallel_size()
    expected = Counter()
    if dp_size > 1 and on_gloo == "per_parameter":
        # One presence mask, one norm sum over DP; a bucket per parameter, reduced by an in-place
        # all-reduce of its gradient. The gather is a broadcast from each rank straight into the
        # parameter, started through torch.distributed itself (comm has no asynchronous calls), so
        # comm's log does not see it; the parameters matching the reference show that it ran.
        expected.update({"all_reduce": 2 + PARAMETERS})
    elif dp_size > 1 and on_gloo == "bucketed":
        # One presence mask, one norm sum over DP, one all-reduce of the packed bucket of all five
        # gradients; the gather broadcasts rows packed for it through torch.distributed (as above).
        expected.update({"all_reduce": 3})
    elif dp_size > 1:
        # One presence mask, one norm sum over DP; one bucket each way for all five fp32 parameters.
        expected.update({"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1})
    if tp_size > 1:
        expected.update({"all_reduce": 1})  # the norm sum over TP
    return expected


def _case_matches_unsharded(optimizer_name: str, on_gloo: str | None = None):
    """`on_gloo`: collectives on gloo, with "bucketed" (default) buckets or "per_parameter" (in-place reduction and gather)."""
    if on_gloo:
        comm.set_backend("torch")
    try:
        return _matches_unsharded(optimizer_name, on_gloo)
    finally:
        comm.set_backend("auto")


def _matches_unsharded(optimizer_name: str, on_gloo: str | None):
    optimizer_class, hyper = OPTIMIZERS[optimizer_name]
    reference, model = _models()
    _check_shards(model, reference, rtol=0, atol=0)
    max_norm = 0.5
    ref_opt = optimizer_class(reference.parameters(), **hyper)
    caps = dict(bucket_cap_mb_reduce_scatter=1e-9, bucket_cap_mb_all_gather=1e-9) if on_gloo == "per_parameter" else {}
    opt = NeuronZero1Optimizer(model.parameters(), optimizer_class, max_norm=max_norm, **caps, **hyper)
    schedule = lambda step: 1.0 / (1.0 + 0.5 * step)  # noqa: E731
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    norms, clipped = [], 0
    for step in range(STEPS):
        x, y = _data(step)
        ref_opt.zero_grad()
        _loss(reference, x, y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        ref_opt.step()
        ref_sched.step()

        opt.zero_grad()
        _loss(model, _local_batch(x), _local_batch(y)).backward()
        with comm.record_collectives() as log:
            opt.step()
        sched.step()
        assert log.counts() == _expected_step_collectives(on_gloo), log.counts()
        if on_gloo:
            assert {engine for _, engine, _ in log.calls} <= {"torch"}, log.calls
        torch.testing.assert_close(opt.grad_norm, ref_norm, **TOL)
        _check_shards(model, reference)
        # The scheduler's lr reached the wrapped optimizer (it steps with the lr of the step's start).
        assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(hyper["lr"] * schedule(step))
        norms.append(float(ref_norm))
        clipped += float(ref_norm) > max_norm
    assert clipped > 0, norms  # clipping took part
    return _state_elements(opt)


def _state_elements(opt) -> tuple[int, int, int]:
    """(elements of this rank's optimizer state tensors, of its master chunks, of its local model)."""
    state = sum(v.numel() for s in opt.base_optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    masters = sum(p.numel() for g in opt.base_optimizer.param_groups for p in g["params"])
    local = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return state, masters, local


@pytest.mark.parametrize("on_gloo", [None, "bucketed", "per_parameter"], ids=["default", "gloo", "per_parameter_on_gloo"])
@pytest.mark.parametrize("world_size,tp", ZERO1_TOPOLOGIES)
def test_zero1_adamw_matches_unsharded(pools, world_size, tp, on_gloo):
    results = pools.run(world_size, tp, _case_matches_unsharded, "adamw", on_gloo)
    dp = world_size // tp
    for state, masters, local in results:
        assert masters == sum(math.ceil(n / dp) for n in _local_numels(tp))
        assert state == 2 * masters  # exp_avg and exp_avg_sq of this rank's chunks only
        assert local / dp <= masters < local / dp + len(_local_numels(tp))


def _local_numels(tp: int) -> list[int]:
    return [FFN // tp * HIDDEN, FFN // tp, HIDDEN * FFN // tp, HIDDEN, HIDDEN]


@pytest.mark.parametrize("world_size,tp,optimizer_name", [
    (2, 1, "sgd_momentum"), (4, 1, "sgd_momentum"), (4, 2, "sgd_momentum"),
    (2, 1, "adamw_fp32_optim_params"), (4, 2, "adamw_fp32_optim_params"),
])
def test_zero1_other_optimizers_match_unsharded(pools, world_size, tp, optimizer_name):
    pools.run(world_size, tp, _case_matches_unsharded, optimizer_name)
    if optimizer_name == "sgd_momentum":
        pools.run(world_size, tp, _case_matches_unsharded, optimizer_name, "per_parameter")


def _case_bf16_fp32_master():
    """bf16 parameters, fp32 masters: the masters equal an fp32-master reference on the same bf16 gradients."""
    reference, model = _models(torch.bfloat16)
    dp_size = parallel_state.get_data_parallel_size()
    masters = [p.detach().float().clone().requires_grad_(True) for p in reference.parameters()]
    lr, max_norm = 3e-4, 0.5
    ref_opt = torch.optim.AdamW(masters, lr=lr)
    opt = NeuronZero1Optimizer(model.parameters(), torch.optim.AdamW, optimizer_dtype=torch.float32, max_norm=max_norm, lr=lr)
    for step in range(STEPS):
        x, y = _data(step)
        # The reference sums the DP slices' bf16 gradients in bf16, as the reduce-scatter does.
        summed = [None] * len(masters)
        for x_part, y_part in zip(x.chunk(dp_size), y.chunk(dp_size)):
            reference.zero_grad()
            _loss(reference, x_part, y_part).backward()
            summed = [p.grad if s is None else s + p.grad for s, p in zip(summed, reference.parameters())]
        for master, grad in zip(masters, summed):
            master.grad = grad.float() / dp_size
        torch.nn.utils.clip_grad_norm_(masters, max_norm)
        ref_opt.step()
        with torch.no_grad():
            for param, master in zip(reference.parameters(), masters):
                param.copy_(master)

        opt.zero_grad()
        _loss(model, _local_batch(x), _local_batch(y)).backward()
        opt.step()
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        _check_shards(model, reference, rtol=2**-7, atol=1e-6)  # within bf16 rounding of the parameters
    # The fp32 masters carry what bf16 cannot: compare them with the reference's masters.
    rank, _ = _sharding_rank_size(opt)
    tp_size, tp_rank = parallel_state.get_tensor_model_parallel_size(), parallel_state.get_tensor_model_parallel_rank()
    shards = opt.state_dict()["master_weights"]
    for master, ref_master, param in zip(shards, masters, model.parameters()):
        assert master.dtype == torch.float32
        full = expected_shard(ref_master.detach(), param, tp_rank, tp_size).reshape(-1)
        chunk = master.numel()
        owned = full[rank * chunk : (rank + 1) * chunk]
        torch.testing.assert_close(master[: owned.numel()], owned, **TOL)


def _sharding_rank_size(opt):
    layout = opt.state_dict()["sharding"]
    return layout["rank"], layout["size"]


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 1)])
def test_zero1_bf16_params_keep_fp32_masters(pools, world_size, tp):
    pools.run(world_size, tp, _case_bf16_fp32_master)


def _train(model, opt, steps, scheduler=None):
    for step in steps:
        x, y = _data(step)
        opt.zero_grad()
        _loss(model, _local_batch(x), _local_batch(y)).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _halving(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


def _case_state_dict_round_trip(dtype_name: str):
    dtype = getattr(torch, dtype_name)
    _, model = _models(dtype)
    make = lambda m: NeuronZero1Optimizer(m.parameters(), torch.optim.AdamW, optimizer_dtype=torch.float32, lr=1e-3)  # noqa: E731
    opt = make(model)
    scheduler = _halving(opt)  # the state dict must hold the learning rate the scheduler set after the last step
    _train(model, opt, range(3), scheduler)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    scheduler_state = scheduler.state_dict()
    saved_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, opt, range(3, 6), scheduler)

    _, resumed = _models(dtype)
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            p.copy_(saved_params[name])
    resumed_opt = make(resumed)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed_opt.load_state_dict(loaded)
    resumed_scheduler = _halving(resumed_opt)
    resumed_scheduler.load_state_dict(scheduler_state)
    _train(resumed, resumed_opt, range(3, 6), resumed_scheduler)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name

    # A state dict of another partition (here: other chunk sizes) is refused and changes nothing.
    before = resumed_opt.state_dict()
    wrong = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    wrong["sharding"]["chunks"][0][0] += 1
    with pytest.raises(OptimizerStateError):
        resumed_opt.load_state_dict(wrong)
    with pytest.raises(OptimizerStateError):
        resumed_opt.load_state_dict({"state": {}})
    after = resumed_opt.state_dict()
    for m, n in zip(before["master_weights"], after["master_weights"]):
        assert torch.equal(m, n)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("world_size,tp", [(2, 1), (4, 2)])
def test_zero1_state_dict_round_trip_resumes_exactly(pools, world_size, tp, dtype_name):
    pools.run(world_size, tp, _case_state_dict_round_trip, dtype_name)


def _case_missing_gradients():
    """A parameter without a gradient anywhere is skipped; one with a gradient on DP rank 0 only is averaged with zeros.

    Between steps the parameter is overwritten outside the optimizer: the next step starts from the new value.
    """
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    unused = nn.Parameter(torch.ones(3))
    partial = nn.Parameter(torch.ones(5))
    weight = torch.arange(5, dtype=torch.float32)
    ref_partial = nn.Parameter(torch.ones(5))
    ref_opt = torch.optim.SGD([ref_partial], lr=0.1, momentum=0.9)
    opt = NeuronZero1Optimizer([unused, partial], torch.optim.SGD, grad_clipping=False, lr=0.1, momentum=0.9)
    for step in range(3):
        if step == 2:  # parameters set outside step() (e.g. loaded from a checkpoint) are what the next step starts from
            with torch.no_grad():
                partial.fill_(3.0)
                ref_partial.fill_(3.0)
        opt.zero_grad()
        if dp_rank == 0:
            (partial * weight).sum().backward()
        with comm.record_collectives() as log:
            opt.step()
        ref_opt.zero_grad()
        ((ref_partial * weight).sum() / dp_size).backward()
        ref_opt.step()
        torch.testing.assert_close(partial.detach(), ref_partial.detach(), **TOL)
        assert torch.equal(unused.detach(), torch.ones(3))
        expected = Counter({"all_reduce": 1, "reduce_scatter": 1, "all_gather": 1}) if dp_size > 1 else Counter()
        assert log.counts() == expected
    masters = opt.base_optimizer.param_groups[0]["params"]
    assert masters[0] not in opt.base_optimizer.state  # never stepped: no momentum buffer
    assert opt.grad_norm is None  # grad_clipping=False computes no norm (as upstream)


@pytest.mark.parametrize("world_size,tp", [(2, 1), (4, 2)])
def test_zero1_skips_parameters_without_gradients(pools, world_size, tp):
    pools.run(world_size, tp, _case_missing_gradients)


def _case_buckets_and_param_groups():
    """Bucket caps split the collectives; a second parameter group (added later) steps with its own lr."""
    dp_size = parallel_state.get_data_parallel_size()
    reference, model = _models()
    ref_opt = torch.optim.SGD([{"params": reference.mlp.parameters()}], lr=0.1)
    ref_opt.add_param_group({"params": [reference.scale], "lr": 0.3})
    opt = NeuronZero1Optimizer([{"params": model.mlp.parameters()}], torch.optim.SGD, grad_clipping=False, lr=0.1,
                               bucket_cap_mb_reduce_scatter=1e-9)
    opt.add_param_group({"params": [model.scale], "lr": 0.3})
    x, y = _data(0)
    ref_opt.zero_grad()
    _loss(reference, x, y).backward()
    ref_opt.step()
    opt.zero_grad()
    _loss(model, _local_batch(x), _local_batch(y)).backward()
    with comm.record_collectives() as log:
        opt.step()
    _check_shards(model, reference)
    if dp_size > 1:
        # A bucket per parameter for the reduce-scatter (tiny cap), one bucket for the all-gather.
        assert log.counts() == Counter({"all_reduce": 1, "reduce_scatter": 5, "all_gather": 1})


@pytest.mark.parametrize("world_size,tp", [(2, 1), (4, 2)])
def test_zero1_bucket_caps_and_added_param_groups(pools, world_size, tp):
    pools.run(world_size, tp, _case_buckets_and_param_groups)


def _bad_inputs():
    dp = parallel_state.get_data_parallel_group(as_list=True)
    tp = parallel_state.get_tensor_model_parallel_group(as_list=True)
    world = [sorted(r for group in dp for r in group)]
    rank = torch.distributed.get_rank()
    return {
        "instance, not a class": dict(optimizer_class=torch.optim.AdamW([nn.Parameter(torch.ones(1))])),
        "not an optimizer": dict(optimizer_class=dict),
        "max_norm zero": dict(max_norm=0.0),
        "max_norm nan": dict(max_norm=float("nan")),
        "max_norm bool": dict(max_norm=True),
        "integer optimizer_dtype": dict(optimizer_dtype=torch.int32),
        "sharding over the world": dict(sharding_groups=world) if world != dp else dict(sharding_groups=[[0]]),
        "sharding groups not lists": dict(sharding_groups=5),
        "grad_norm_groups not TP": dict(grad_norm_groups=dp if dp != tp else [[0]]),
        "bad lr": dict(lr=-1.0),
        "bad kwarg": dict(no_such_argument=1),
        "only rank 0 bad": dict(max_norm=-1.0 if rank == 0 else 1.0),
        "ranks disagree": dict(max_norm=1.0 + rank),
        "shapes differ": dict(params=[nn.Parameter(torch.ones(2 + rank))]),
        "empty params": dict(params=[]),
    }


def _case_bad_input():
    raised = {}
    for name, kwargs in _bad_inputs().items():
        arguments = dict(params=[nn.Parameter(torch.ones(4))], optimizer_class=torch.optim.AdamW)
        arguments.update(kwargs)
        try:
            NeuronZero1Optimizer(arguments.pop("params"), arguments.pop("optimizer_class"), **arguments)
        except OptimizerConfigError:
            raised[name] = "OptimizerConfigError"
        else:
            raised[name] = "nothing"
    # The group still works afterwards: a valid optimizer steps (one rank spells out the defaults, which agrees).
    param = nn.Parameter(torch.ones(4))
    spelled = dict(sharding_groups=parallel_state.get_data_parallel_group(as_list=True), max_norm=None,
                   optimizer_dtype=torch.float32) if torch.distributed.get_rank() == 0 else {}
    opt = NeuronZero1Optimizer([param], torch.optim.SGD, lr=0.1, **spelled)
    param.grad = torch.ones(4)
    opt.step()
    with pytest.raises(OptimizerConfigError):
        NeuronZero1Optimizer([param], torch.optim.SGD, lazy_init=True, lr=0.1).step()
    return raised


@pytest.mark.parametrize("world_size,tp", [(2, 1), (4, 2)])
def test_zero1_bad_input_raises_on_every_rank(pools, world_size, tp):
    for raised in pools.run(world_size, tp, _case_bad_input):
        assert set(raised.values()) == {"OptimizerConfigError"}, raised


def _case_before_initialize():
    try:
        NeuronZero1Optimizer([nn.Parameter(torch.ones(2))], torch.optim.AdamW)
    except ModelParallelNotInitializedError:
        return "ModelParallelNotInitializedError"
    return "nothing"


def test_zero1_before_initialize_model_parallel_raises(pools):
    assert pools.get(2).run(_case_before_initialize) == ["ModelParallelNotInitializedError"] * 2


def test_adamw_fp32_optim_params_matches_torch_adamw_without_eps_and_decay():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    ours = AdamW_FP32OptimParams(params, lr=1e-2, eps=0.0)
    theirs = torch.optim.AdamW(twins, lr=1e-2, eps=0.0, weight_decay=0.0)
    for _ in range(5):
        grads = [torch.randn(p.shape) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_adamw_fp32_optim_params_keeps_fp32_moments_for_bf16():
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(32).bfloat16())
    twin = nn.Parameter(param.detach().float())
    ours = AdamW_FP32OptimParams([param], lr=1e-2, weight_decay=0.1)
    fp32 = AdamW_FP32OptimParams([twin], lr=1e-2, weight_decay=0.1)
    grad = torch.randn(32).bfloat16()
    param.grad, twin.grad = grad, grad.float()
    ours.step()
    fp32.step()
    assert ours.state[param]["exp_avg"].dtype == torch.float32
    assert ours.state[param]["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(ours.state[param]["exp_avg_sq"], fp32.state[twin]["exp_avg_sq"], rtol=0, atol=0)
    assert torch.equal(param.detach(), twin.detach().bfloat16())
    with pytest.raises(OptimizerConfigError):
        AdamW_FP32OptimParams([param], betas=(0.9, 1.0))

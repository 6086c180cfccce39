"""Multi-node jobs on simulated nodes (tests/nodes.py): 2 nodes x 2 ranks, launched by torchrun.

Collectives on groups that span both nodes with two ranks on each (the world group, the DP
group at TP=1) run hierarchically (shared memory inside a node, gloo across): every rank gets
the same bytes, equal to the reduction in that order of every rank's input, and equal (ints,
max) or close (float sums, in another order) to plain gloo over the group. Then the layer and
checkpoint cases of test_layers and test_checkpoint at TP=2 inside a node x DP=2 across
nodes (and TP=1 and TP=4 over both nodes): the same assertions against the unsharded model.

Everything runs in one launch (each launch costs torch's start-up on 6 processes).
"""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch
import torch.distributed as dist
from nodes import run_on_nodes, unavailable

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.comm import hierarchical
from neuronx_distributed.errors import NeuronxDistributedError

SIZES = [1, 5, 7919, 600_001]  # odd sizes (not multiples of 2 ranks per node), and several 1 MiB shm chunks
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32]
SUM_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 7919 + dist.get_rank())
    if dtype.is_floating_point:
        return torch.randn(numel, generator=generator).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=generator, dtype=dtype)


def _large_sizes() -> list[tuple[torch.dtype, int]]:
    """Sizes of several slots of the local segment (2 ranks per node): odd (the last element padded) and even."""
    slots_bytes = 3 * hierarchical.local_slot_bytes(2)
    return [(torch.float32, slots_bytes // 4 + 3), (torch.bfloat16, slots_bytes // 2 + 2 * 7)]


def _hierarchical_reference(inputs: list[torch.Tensor], hosts: list[str], op: str) -> torch.Tensor:
    """The two-level reduction: each host's ranks in rank order (accumulating in float32, float64
    for float64, as the shared-memory engine does), rounded to the dtype, then the hosts' results."""
    dtype = inputs[0].dtype
    wide = torch.float64 if dtype in (torch.float64, torch.int64, torch.int32) else torch.float32
    combine = torch.add if op == "sum" else torch.maximum
    per_host = {}
    for tensor, host in zip(inputs, hosts):
        per_host[host] = tensor.to(wide) if host not in per_host else combine(per_host[host], tensor.to(wide))
    partials = [partial.to(dtype) for partial in per_host.values()]
    result = partials[0]
    for partial in partials[1:]:
        result = combine(result, partial)
    return result


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor, group=group)
    return out


def _case_collectives() -> dict:
    """Worker, at TP=1: every collective on the world and DP groups against gloo and the reference."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    odd = dist.new_group([0, 1, 2])  # 2 ranks on one node, 1 on the other: not two-level
    groups = {"world": dist.group.WORLD, "dp": parallel_state.get_data_parallel_group()}
    report = {
        "hosts": hosts,
        "engines": {
            name: [comm.engine_for(group, torch.empty(0, dtype=dtype)).name for dtype in (torch.float32, torch.int64)]
            for name, group in groups.items()
        },
        "odd_group_engine": comm.engine_for(odd, torch.empty(0)).name if dist.get_rank() < 3 else None,
        "digests": {},
    }
    for group_name, group in groups.items():
        group_hosts = [hosts[rank] for rank in dist.get_process_group_ranks(group)]
        for seed, (dtype, numel, op) in enumerate(
            (dtype, numel, op) for dtype in DTYPES for numel in SIZES for op in ("sum", "max")
        ):
            data = _inputs(dtype, numel, seed)
            case = f"{group_name} {dtype} n={numel} {op}"
            with comm.record_collectives() as log:
                result = comm.all_reduce(data.clone(), op=op, group=group)
            expected_engine = "hierarchical" if dtype.is_floating_point else "torch"
            assert log.calls == [("all_reduce", expected_engine, numel)], (case, log.calls)
            reference = _hierarchical_reference(_gather(data, group), group_hosts, op)
            assert torch.equal(result, reference), case
            by_gloo = data.clone()
            dist.all_reduce(by_gloo, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
            if op == "sum" and dtype.is_floating_point:
                tolerance = SUM_TOLERANCE[dtype] * len(group_hosts)
                torch.testing.assert_close(result, by_gloo, rtol=tolerance, atol=tolerance, msg=case)
            else:
                assert torch.equal(result, by_gloo), case
            report["digests"][case] = _digest(result)
        _check_gathers(group, group_name)
    for dtype, numel in _large_sizes():
        data = _inputs(dtype, numel, numel)
        result = comm.all_reduce(data.clone(), group=dist.group.WORLD)
        reference = _hierarchical_reference(_gather(data, dist.group.WORLD), hosts, "sum")
        assert torch.equal(result, reference), (dtype, numel)
        report["digests"][f"large {dtype} n={numel}"] = _digest(result)
    dist.destroy_process_group(odd)
    return report


def _check_gathers(group, group_name: str) -> None:
    """reduce_scatter, all_gather and broadcast of the two-level engine against gloo, exactly."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    for dtype in (torch.float32, torch.bfloat16):
        data = _inputs(dtype, world * 3 * 5, 99).view(world * 3, 5)
        with comm.record_collectives() as log:
            gathered = comm.all_gather(data, dim=0, group=group)
            scattered = comm.reduce_scatter(data, dim=0, group=group)
            broadcast = comm.broadcast(data.clone(), src=dist.get_process_group_ranks(group)[world - 1], group=group)
        assert {engine for _, engine, _ in log.calls} == {"hierarchical"}, log.calls
        inputs = _gather(data, group)
        assert torch.equal(gathered, torch.cat(inputs, dim=0)), (group_name, dtype)
        reduced = _hierarchical_reference(inputs, _group_hosts(group), "sum")
        assert torch.equal(scattered, reduced.chunk(world, dim=0)[rank]), (group_name, dtype)
        assert torch.equal(broadcast, inputs[world - 1]), (group_name, dtype)


def _group_hosts(group) -> list[str]:
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return hosts


# Calls where some ranks differ: case -> {global rank: its call}; the other ranks issue DEFAULT_MIXED_CALL's.
MIXED_CALLS = {
    "size on one rank": {3: "all_reduce n=7"},
    "size on one node": {2: "all_reduce n=7", 3: "all_reduce n=7"},
    "size on the second rank of each node": {1: "all_reduce n=7", 3: "all_reduce n=7"},
    "dtype on one rank": {1: "all_reduce float64"},
    "engine on one rank": {2: "all_reduce int64"},
    "op on one rank": {0: "all_reduce max"},
    "collective on one rank": {3: "barrier"},
    "root on one rank": {1: "broadcast src=0"},
    "refused on one rank": {0: "all_reduce expanded"},
}
DEFAULT_MIXED_CALL = {"all_reduce": "all_reduce n=8", "broadcast": "broadcast src=3"}


def _mixed_call(spec: str, group) -> torch.Tensor:
    """Issue the call that `spec` names on `group` on an input of ones, which stays unchanged if the call raises."""
    collective, _, variant = spec.partition(" ")
    dtype = {"float64": torch.float64, "int64": torch.int64}.get(variant, torch.float32)
    data = torch.ones(1).expand(8) if variant == "expanded" else torch.ones(7 if variant == "n=7" else 8, dtype=dtype)
    try:
        if collective == "barrier":
            comm.barrier(group=group)
        elif collective == "broadcast":
            comm.broadcast(data, src=int(variant.removeprefix("src=")), group=group)
        else:
            comm.all_reduce(data, op="max" if variant == "max" else "sum", group=group)
    except NeuronxDistributedError:
        assert torch.equal(data, torch.ones_like(data)), spec  # a call that raises changes nothing
        raise
    return data


def _case_mixed_calls() -> dict:
    """Worker, at TP=1: on the world group (hierarchical), each case of MIXED_CALLS; every rank
    reports what it raised; then a plain all-reduce shows the group still works."""
    rank = dist.get_rank()
    raised = {}
    for case, differing in MIXED_CALLS.items():
        usual = DEFAULT_MIXED_CALL["broadcast" if case.startswith("root") else "all_reduce"]
        try:
            _mixed_call(differing.get(rank, usual), dist.group.WORLD)
            raised[case] = None
        except NeuronxDistributedError as error:
            raised[case] = [type(error).__name__, str(error)]
    after = torch.full((600_001,), float(rank))
    comm.all_reduce(after, group=dist.group.WORLD)
    return {"raised": raised, "after": after.unique().tolist()}


def _case_engines() -> dict:
    """Worker: the engine of each parallel_state group for CPU float32."""
    return {
        name: comm.engine_for(group, torch.empty(0)).name
        for name, group in (
            ("tp", parallel_state.get_tensor_model_parallel_group()),
            ("dp", parallel_state.get_data_parallel_group()),
            ("world", dist.group.WORLD),
        )
    }


LAYER_CASES = ["column_gather", "column_sharded_out", "row_full_input", "row_parallel_input", "embedding_vocab",
               "embedding_dim", "mlp", "attention_fused_qkv", "attention_seed"]  # fmt: skip


def _calls(save_dir: str) -> list:
    calls = [[1, "test_multinode:_case_collectives", []], [1, "test_multinode:_case_mixed_calls", []]]
    for tp in (2, 1, 4):
        calls.append([tp, "test_multinode:_case_engines", []])
        calls += [[tp, "test_layers:_case_train_step", [case, 0.05]] for case in LAYER_CASES]
    calls.append([2, "test_checkpoint:_case_save", [save_dir]])
    calls += [[tp, "test_checkpoint:_case_load_and_compare", [[save_dir]]] for tp in (2, 1, 4)]
    return calls


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    save_dir = str(tmp_path_factory.mktemp("multinode") / "tp2")
    calls = _calls(save_dir)
    return calls, run_on_nodes(calls, nodes=2, procs_per_node=2, timeout_s=240)


def _index(calls: list, tp, target: str, *args) -> int:
    return next(i for i, call in enumerate(calls) if call[:2] == [tp, target] and (not args or call[2][: len(args)] == list(args)))


def test_ranks_run_on_two_nodes(job):
    calls, run = job
    assert [report["host"] for report in run.ranks] == ["nxd-node0", "nxd-node0", "nxd-node1", "nxd-node1"]


def test_hierarchical_collectives_bit_identical_on_every_rank(job):
    calls, run = job
    reports = run.values(_index(calls, 1, "test_multinode:_case_collectives"))
    for report in reports:
        assert report["engines"] == {"world": ["hierarchical", "torch"], "dp": ["hierarchical", "torch"]}
    assert [report["odd_group_engine"] for report in reports] == ["torch", "torch", "torch", None]
    digests = reports[0]["digests"]
    assert len(digests) == 2 * len(DTYPES) * len(SIZES) * 2 + len(_large_sizes())
    for rank, report in enumerate(reports[1:], start=1):
        differing = [case for case, digest in digests.items() if report["digests"][case] != digest]
        assert not differing, f"rank {rank} differs from rank 0 in {differing}"


def test_mixed_calls_raise_on_every_rank(job):
    """A call that differs on one rank or node raises a typed error on every rank, naming it; nothing hangs
    and the group keeps working."""
    calls, run = job
    reports = run.values(_index(calls, 1, "test_multinode:_case_mixed_calls"))
    for rank, report in enumerate(reports):
        assert report["after"] == [0.0 + 1 + 2 + 3], rank
        for case, differing in MIXED_CALLS.items():
            error_type, message = report["raised"][case]
            if case == "refused on one rank" and rank in differing:
                assert error_type == "InputShapeError", (case, rank, message)
                continue
            assert error_type == "CollectiveError", (case, rank, error_type, message)
            named = sorted(differing)
            if case == "refused on one rank":
                assert f"global rank {named[0]} refused its input of all_reduce (InputShapeError" in message, message
            else:
                assert f"global ranks {named}: " in message, (case, message)


@pytest.mark.parametrize(
    "tp,engines",
    [
        (2, {"tp": "shm", "dp": "torch", "world": "hierarchical"}),  # TP inside a node, DP across
        (1, {"tp": "torch", "dp": "hierarchical", "world": "hierarchical"}),  # a size-1 group stays on torch
        (4, {"tp": "hierarchical", "dp": "torch", "world": "hierarchical"}),
    ],
)
def test_layers_match_unsharded_model_across_nodes(job, tp, engines):
    calls, run = job
    assert run.values(_index(calls, tp, "test_multinode:_case_engines")) == [engines] * 4
    for case in LAYER_CASES:
        run.values(_index(calls, tp, "test_layers:_case_train_step", case))


def test_checkpoint_saved_on_two_nodes_loads_at_any_tp(job):
    calls, run = job
    listings = run.values(_index(calls, 2, "test_checkpoint:_case_save"))
    assert listings[0] == ["manifest.json", "tp_rank_00", "tp_rank_01"]
    for tp in (2, 1, 4):
        run.values(_index(calls, tp, "test_checkpoint:_case_load_and_compare"))

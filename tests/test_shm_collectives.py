"""The shared-memory engine through `neuronx_distributed.comm` in real processes (gloo for
set-up and references): randomized collectives on several groups at once, exact references,
the TP layers with NXD_COMM_BACKEND=shm and =torch, dtypes it refuses, and torch.compile/export.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.distributed as dist

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import CollectiveError, CommBackendError

WORLD = 4
# Elements per case: empty, odd, below and above the one-step reduction limit, and several
# shared-memory chunks (the default slot is 1 MiB).
SIZES = [0, 1, 5, 7919, 40_003, 600_001]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _set_backend(name: str) -> None:
    comm.set_backend(name)


def _groups() -> dict[str, dist.ProcessGroup]:
    """Groups of the job alive at once: TP pairs, DP pairs, the world and an odd one."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_group(),
        "dp": parallel_state.get_data_parallel_group(),
        "world": dist.group.WORLD,
    }


def _torch_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's tensor through gloo, as an exact reference input."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def _sequential_reduce(tensors: list[torch.Tensor], op: str) -> torch.Tensor:
    """What the engine computes: rank order, accumulating in float32 (float64 for float64)."""
    wide = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    acc = tensors[0].to(wide)
    for tensor in tensors[1:]:
        acc = acc + tensor.to(wide) if op == "sum" else torch.maximum(acc, tensor.to(wide))
    return acc.to(tensors[0].dtype)


def _random_cases(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "collective": rng.choice(["all_reduce", "all_gather", "reduce_scatter", "broadcast"]),
            "group": rng.choice(["tp", "dp", "world"]),
            "dtype": rng.choice(DTYPES),
            "numel": rng.choice(SIZES),
            "op": rng.choice(["sum", "max"]),
            "columns": rng.choice([1, 4]),
            "seed": rng.randrange(1 << 30),
        }
        for _ in range(count)
    ]


def _check_case(case: dict) -> None:
    group = _groups()[case["group"]]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    generator = torch.Generator().manual_seed(case["seed"] + dist.get_rank())
    numel = case["numel"] - case["numel"] % (world * case["columns"])
    data = torch.randn(numel, generator=generator).to(case["dtype"]).reshape(-1, case["columns"])
    collective, op = case["collective"], case["op"]
    _set_backend("shm")
    with comm.record_collectives() as log:
        if collective == "all_reduce":
            result = comm.all_reduce(data.clone(), op=op, group=group)
            expected = _sequential_reduce(_torch_gather(data, group), op)
        elif collective == "all_gather":
            result = comm.all_gather(data, dim=0, group=group)
            expected = torch.cat(_torch_gather(data, group), dim=0)
        elif collective == "reduce_scatter":
            result = comm.reduce_scatter(data, dim=0, op=op, group=group)
            expected = _sequential_reduce(_torch_gather(data, group), op).chunk(world, dim=0)[rank]
        else:
            src = dist.get_global_rank(group, world - 1)
            result = comm.broadcast(data.clone(), src=src, group=group)
            expected = _torch_gather(data, group)[world - 1]
    _set_backend("auto")
    if [engine for _, engine, _ in log.calls] != ["shm"]:
        raise AssertionError(f"{case}: expected one shm collective, got {log.calls}")
    if not torch.equal(result, expected):
        raise AssertionError(f"{case}: differs from the exact reference by {(result - expected).abs().max()}")
    # Identical bits on every rank (for the collectives whose result is replicated).
    if collective in ("all_reduce", "all_gather", "broadcast"):
        for other in _torch_gather(result, group):
            if not torch.equal(other.view(torch.uint8), result.view(torch.uint8)):
                raise AssertionError(f"{case}: ranks hold different results")


def _check_against_gloo(dtype: torch.dtype) -> None:
    """All-reduce through shm and through gloo give the same sums (up to summation order)."""
    group = dist.group.WORLD
    data = torch.randn(100_003, generator=torch.Generator().manual_seed(dist.get_rank())).to(dtype)
    _set_backend("shm")
    shm = comm.all_reduce(data.clone(), group=group)
    _set_backend("torch")
    gloo = comm.all_reduce(data.clone(), group=group)
    _set_backend("auto")
    torch.testing.assert_close(shm, gloo)


def run_random_cases(seed: int, count: int) -> None:
    for case in _random_cases(seed, count):
        _check_case(case)
    for dtype in (torch.float32, torch.float64):
        _check_against_gloo(dtype)


def test_random_collectives_on_several_groups_match_exact_references(pools):
    pools.run(WORLD, 2, run_random_cases, seed=20261124, count=60)


def run_non_contiguous_and_other_dims() -> None:
    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)
    _set_backend("shm")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * (rank + 1)
    view = base.t()  # not contiguous: all_reduce must write through the view
    comm.all_reduce(view, group=group)
    torch.testing.assert_close(base, torch.arange(24, dtype=torch.float32).reshape(4, 6) * 3)
    gathered = comm.all_gather(torch.full((2, 3), float(rank)), dim=1, group=group)
    torch.testing.assert_close(gathered, torch.tensor([[0.0, 0, 0, 1, 1, 1]] * 2))
    scattered = comm.reduce_scatter(torch.ones(3, 4), dim=1, group=group)
    torch.testing.assert_close(scattered, torch.full((3, 2), 2.0))
    comm.barrier(group=group)
    _set_backend("auto")


def test_non_contiguous_tensors_and_other_dims(pools):
    pools.run(2, 2, run_non_contiguous_and_other_dims)


# Elements per row of a reduce-scatter over 4 ranks (and per broadcast): one step, and several 1 MiB slots.
HANDLE_SIZES = [3, 1000, 5000, 300_001]


def run_handle_reduce_scatter_and_broadcast() -> None:
    """The engine's calls as `hierarchical` makes them: reduce-scatter into a separate tensor and in place
    (into this rank's row), broadcast from every root, each against a gloo reference, bit for bit."""
    from torch.utils.dlpack import to_dlpack

    group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _set_backend("shm")
    try:
        handle = comm.set_up(group).shm.handle
        generator = torch.Generator().manual_seed(7 + rank)
        for numel in HANDLE_SIZES:
            for dtype in DTYPES:
                for op in ("sum", "max"):
                    for in_place in (False, True):
                        rows = torch.randn(world, numel, generator=generator).to(dtype)
                        before = rows.clone()
                        expected = _sequential_reduce(_torch_gather(rows, group), op)[rank]
                        out = rows[rank] if in_place else torch.empty(numel, dtype=dtype)
                        handle.reduce_scatter(to_dlpack(rows), to_dlpack(out), op)
                        case = f"reduce_scatter {numel} x {dtype} {op}{' in place' if in_place else ''}"
                        if not torch.equal(out.view(torch.uint8), expected.view(torch.uint8)):
                            raise AssertionError(f"{case}: differs by {(out - expected).abs().max()}")
                        others = [q for q in range(world) if q != rank]
                        if not torch.equal(rows[others], before[others]):
                            raise AssertionError(f"{case}: changed the other rows of the input")
                root = numel % world
                data = torch.randn(numel, generator=generator).to(dtype)
                expected = _torch_gather(data, group)[root]
                handle.broadcast(to_dlpack(data), root)
                if not torch.equal(data.view(torch.uint8), expected.view(torch.uint8)):
                    raise AssertionError(f"broadcast {numel} x {dtype} from {root}: differs")
    finally:
        _set_backend("auto")


def test_reduce_scatter_in_place_and_broadcast_through_the_handle_match_gloo(pools):
    pools.run(WORLD, 2, run_handle_reduce_scatter_and_broadcast)


def run_large_non_contiguous() -> None:
    """Large views through `comm` (several shared-memory slots): the results land in the view."""
    group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _set_backend("shm")
    try:
        base = torch.randn(world * 128, 2048, generator=torch.Generator().manual_seed(rank))
        view = base.t()  # (2048, world * 128), not contiguous
        scattered = comm.reduce_scatter(view, dim=1, group=group)
        expected = _sequential_reduce(_torch_gather(view, group), "sum").chunk(world, dim=1)[rank]
        torch.testing.assert_close(scattered, expected, rtol=0, atol=0)
        source = _torch_gather(base, group)[world - 1].t().clone()
        comm.broadcast(view, src=world - 1, group=group)
        torch.testing.assert_close(view, source, rtol=0, atol=0)
    finally:
        _set_backend("auto")


def test_large_non_contiguous_reduce_scatter_and_broadcast(pools):
    pools.run(WORLD, 2, run_large_non_contiguous)


def run_every_spelling_of_an_op() -> str:
    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)
    # dist.ReduceOp(...) makes a distinct object equal to ReduceOp.SUM/MAX: the engines, which tell ops apart
    # by identity, must get the canonical one.
    spellings = {
        "sum": ["sum", "SUM", dist.ReduceOp.SUM, dist.ReduceOp(dist.ReduceOp.SUM)],
        "max": ["max", "Max", dist.ReduceOp.MAX, dist.ReduceOp(dist.ReduceOp.MAX)],
    }
    expected = {"sum": ([3.0, 6.0], [3.0 * (rank + 1)]), "max": ([2.0, 4.0], [2.0 * (rank + 1)])}
    for backend in ("shm", "torch"):
        _set_backend(backend)
        try:
            for name, ops in spellings.items():
                for op in ops:
                    with comm.record_collectives() as log:
                        reduced = comm.all_reduce(torch.tensor([1.0, 2.0]) * (rank + 1), op=op, group=group)
                        scattered = comm.reduce_scatter(torch.tensor([1.0, 2.0]) * (rank + 1), 0, op, group=group)
                    got = (reduced.tolist(), scattered.tolist())
                    if got != expected[name] or {engine for _, engine, _ in log.calls} != {backend}:
                        raise AssertionError(f"{backend}, op {op!r}: {got} via {log.calls}, expected {expected[name]}")
        finally:
            _set_backend("auto")
    return "ok"


def test_every_spelling_of_an_op_reduces_as_named_on_either_engine(pools):
    assert pools.run(2, 2, run_every_spelling_of_an_op) == ["ok", "ok"]


def run_unsupported_dtypes() -> str:
    group = parallel_state.get_tensor_model_parallel_group()
    integers = torch.arange(6)
    _set_backend("shm")
    try:
        with pytest.raises(CollectiveError, match="shared-memory engine cannot run"):
            comm.all_reduce(integers, group=group)
        # Straight to the op (on a group that is set up): the C++ side refuses too.
        comm.barrier(group=group)
        with pytest.raises(TypeError, match="float32, float64, bfloat16 and float16"):
            torch.ops.nxd.shm_all_reduce_(integers, "sum", group.group_name)
    finally:
        _set_backend("auto")
    # auto falls back to gloo for what the engine cannot run.
    with comm.record_collectives() as log:
        result = comm.all_reduce(integers.clone(), group=group)
    if not torch.equal(result, integers * 2) or log.calls[0][1] != "torch":
        raise AssertionError(f"auto fallback: {result} via {log.calls}")
    return "ok"


def test_unsupported_dtypes_raise_under_shm_and_fall_back_under_auto(pools):
    assert pools.run(2, 2, run_unsupported_dtypes) == ["ok", "ok"]


def _mlp_step(backend: str, seed: int) -> dict[str, torch.Tensor]:
    """One forward/backward of a Column->Row parallel MLP plus DP gradient averaging."""
    from neuronx_distributed.parallel_layers import ColumnParallelLinear, RowParallelLinear, all_reduce_gradients

    _set_backend(backend)
    try:
        torch.manual_seed(seed)
        up = ColumnParallelLinear(32, 64, gather_output=False)
        down = RowParallelLinear(64, 32, input_is_parallel=True)
        torch.manual_seed(seed + 1 + parallel_state.get_data_parallel_rank())
        x = torch.randn(8, 32)
        with comm.record_collectives() as log:
            out = down(torch.relu(up(x)))
            out.square().mean().backward()
            all_reduce_gradients(list(up.parameters()) + list(down.parameters()))
    finally:
        _set_backend("auto")
    engines = {engine for _, engine, _ in log.calls}
    if engines != {backend}:
        raise AssertionError(f"NXD_COMM_BACKEND={backend} ran collectives on {engines}")
    return {"out": out.detach(), **{f"grad.{n}": p.grad for n, p in [*up.named_parameters(), *down.named_parameters()]}}


def run_tp_mlp_both_engines() -> None:
    for seed in range(3):
        shm, gloo = _mlp_step("shm", seed), _mlp_step("torch", seed)
        for name in shm:
            # Sums of two ranks are exact in either order: the engines must agree bit for bit.
            torch.testing.assert_close(shm[name], gloo[name], rtol=0, atol=0, msg=name)


def test_tp_layers_give_the_same_results_with_shm_and_torch(pools):
    pools.run(WORLD, 2, run_tp_mlp_both_engines)


def run_compiled_and_exported() -> str:
    group = parallel_state.get_tensor_model_parallel_group()

    def step(x):
        y = x * 2
        comm.all_reduce(y, group=group)
        return comm.all_gather(y, dim=0, group=group) + 1

    _set_backend("shm")
    try:
        x = torch.full((4,), float(dist.get_rank(group) + 1))
        eager = step(x)
        compiled = torch.compile(step)(x)
        torch.testing.assert_close(compiled, eager)

        class Step(torch.nn.Module):
            def forward(self, x):
                return step(x)

        graph = str(torch.export.export(Step(), (x,)).graph)
    finally:
        _set_backend("auto")
    for op in ("nxd.shm_all_reduce_", "nxd.shm_all_gather"):
        if op not in graph:
            raise AssertionError(f"{op} missing from the exported graph:\n{graph}")
    return "ok"


def test_collectives_are_opaque_ops_under_compile_and_export(pools):
    assert pools.run(2, 2, run_compiled_and_exported) == ["ok", "ok"]


def run_timeout_settings() -> None:
    group = parallel_state.get_tensor_model_parallel_group()
    comm.set_backend("shm", timeout_s=123.0)
    try:
        if comm.set_up(group).shm.handle.timeout != 123.0:
            raise AssertionError("set_backend's timeout did not reach the group")
        with pytest.raises(CommBackendError, match="positive"):
            comm.set_backend("shm", timeout_s=0)
    finally:
        comm.set_backend("auto")


def test_timeout_is_configurable(pools):
    pools.run(2, 2, run_timeout_settings)


def run_groups_and_list_mapped_segments() -> dict:
    """Set up shared memory for three groups of this job; return the segments this process maps."""
    _set_backend("shm")
    try:
        for group in (dist.new_group([0, 1]), dist.new_group([0, 1]), parallel_state.get_tensor_model_parallel_group()):
            comm.all_reduce(torch.ones(8), group=group)
    finally:
        _set_backend("auto")
    with open("/proc/self/maps") as maps:
        mapped = {line.split("/dev/shm/", 1)[1].split()[0] for line in maps if f"/dev/shm/nxd-{os.getuid()}-" in line}
    return {"pid": os.getpid(), "mapped": sorted(mapped)}


def test_segments_in_use_have_no_name_left_in_dev_shm(pools):
    # Names are nxd-<uid>-<pid namespace>-<creator pid>-<token>. The workers are alive and map the
    # segments of the groups they just used: each segment exists, and its name must already be gone.
    results = pools.run(2, 2, run_groups_and_list_mapped_segments)
    mapped = {name for got in results for name in got["mapped"]}
    assert all(len(got["mapped"]) >= 3 for got in results), results
    assert [name for name in mapped if os.path.exists(os.path.join("/dev/shm", name))] == []
    workers = {pid for world in (2, WORLD) for pid in pools.get(world).run(os.getpid)}
    leftovers = [
        name
        for name in os.listdir("/dev/shm")
        if name.startswith(f"nxd-{os.getuid()}-") and int(name.split("-")[3]) in workers
    ]
    assert leftovers == []


def _mapped_segments() -> int:
    with open("/proc/self/maps") as maps:
        return sum(f"/dev/shm/nxd-{os.getuid()}-" in line for line in maps)


def run_destroyed_groups_are_unmapped() -> None:
    before = _mapped_segments()
    _set_backend("shm")
    try:
        for _ in range(3):
            group = dist.new_group(list(range(dist.get_world_size())))
            comm.all_reduce(torch.ones(4), group=group)
            dist.destroy_process_group(group)
        comm.barrier(group=parallel_state.get_tensor_model_parallel_group())  # one more new group
    finally:
        _set_backend("auto")
    # Without unmapping there would be before + 4 segments: the 3 destroyed groups and the TP group.
    if _mapped_segments() > before + 1:
        raise AssertionError(f"{_mapped_segments()} shared-memory mappings, {before} before the loop")


def test_segments_of_destroyed_groups_are_unmapped(pools):
    pools.run(2, 2, run_destroyed_groups_are_unmapped)

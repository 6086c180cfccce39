"""Ranks that disagree about a collective fail at once, on every rank, with a typed error.

Real processes and gloo, the real C++ engine (NXD_COMM_BACKEND=auto): one rank's tensor
has a dtype that only torch.distributed runs while its peer's goes to shared memory, one
rank's input is invalid while its peer's is fine, sizes/ops/sources differ; and calls on
groups that this rank cannot use. Each case runs on a fresh group (a disagreement aborts
the group's shared memory for good). Before the engines agreed per call, the split cases
hung until a timeout: the bounded `run(..., timeout=)` turns that into a failure.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from neuronx_distributed import comm

ANSWER_S = 60  # far above what any case takes; only a hang reaches it


def _outcome(fn) -> str:
    try:
        return f"returned {fn()!r}"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        return f"{type(error).__name__}: {error}"


def _split_call(case: str):
    """The call this rank makes in `case`: rank 0 differs from rank 1."""
    first = dist.get_rank() == 0
    if case == "int64 here, float32 there":
        return lambda group: comm.all_reduce(torch.ones(6, dtype=torch.int64) if first else torch.ones(6), group=group)
    if case == "expanded tensor written in place":
        return lambda group: comm.all_reduce(torch.ones(1).expand(6) if first else torch.ones(6), group=group)
    if case == "all_gather dim out of range":
        return lambda group: comm.all_gather(torch.ones(2, 3), dim=5 if first else 0, group=group)
    if case == "unknown reduce op":
        return lambda group: comm.all_reduce(torch.ones(2), op="avg" if first else "sum", group=group)
    if case == "not a tensor":
        return lambda group: comm.all_reduce([1.0, 2.0] if first else torch.ones(2), group=group)
    if case == "reduce_scatter size not divisible":
        return lambda group: comm.reduce_scatter(torch.ones(3 if first else 4), dim=0, group=group)
    if case == "broadcast source outside the group":
        return lambda group: comm.broadcast(torch.ones(3), src=7 if first else 0, group=group)
    if case == "different sizes":
        return lambda group: comm.all_reduce(torch.ones(3 if first else 4), group=group)
    if case == "different ops":
        return lambda group: comm.all_reduce(torch.ones(3), op="sum" if first else "max", group=group)
    if case == "different broadcast sources":
        return lambda group: comm.broadcast(torch.ones(3), src=0 if first else 1, group=group)
    if case == "all_gather of equal bytes in different dtypes":
        return lambda group: comm.all_gather(torch.ones(4) if first else torch.ones(8, dtype=torch.float16), group=group)
    raise ValueError(case)


def run_split_case(case: str) -> dict:
    group = dist.new_group([0, 1])
    comm.barrier(group=group)  # the group's shared memory is set up: the case itself is one call
    return {"call": _outcome(lambda: _split_call(case)(group)), "after": _outcome(lambda: comm.barrier(group=group))}


# case -> (rank 0's outcome starts with, text in it), rank 1's likewise.
SPLIT_CASES = {
    "int64 here, float32 there": (
        ("CollectiveError", "rank 0 called all_reduce(sum, 6 elements) on torch.distributed"),
        ("CollectiveError", "rank 0 called all_reduce(sum, 6 elements) on torch.distributed"),
    ),
    "expanded tensor written in place": (
        ("InputShapeError", "elements share memory"),
        ("CollectiveError", "refused for invalid input"),
    ),
    "all_gather dim out of range": (
        ("InputShapeError", "dim 5 is out of range"),
        ("CollectiveError", "refused for invalid input"),
    ),
    "unknown reduce op": (
        ("CollectiveError", "reduce op 'avg' is not supported"),
        ("CollectiveError", "refused for invalid input"),
    ),
    "not a tensor": (
        ("CollectiveError", "collectives take a torch.Tensor, got list"),
        ("CollectiveError", "refused for invalid input"),
    ),
    "reduce_scatter size not divisible": (
        ("InputShapeError", "divisible by the group size 2"),
        ("CollectiveError", "refused for invalid input"),
    ),
    "broadcast source outside the group": (
        ("CollectiveError", "broadcast source 7 is not a rank of this group"),
        ("CollectiveError", "refused for invalid input"),
    ),
    "different sizes": (
        ("CollectiveError", "issued different collectives"),
        ("CollectiveError", "issued different collectives"),
    ),
    "different ops": (
        ("CollectiveError", "issued different collectives"),
        ("CollectiveError", "issued different collectives"),
    ),
    "different broadcast sources": (
        ("CollectiveError", "issued different collectives"),
        ("CollectiveError", "issued different collectives"),
    ),
    # Both go to shared memory with 16 bytes each: before the dtype was compared, each rank got the other's
    # bytes reinterpreted in its own dtype, silently.
    "all_gather of equal bytes in different dtypes": (
        ("CollectiveError", "all_gather(float32, 16 bytes) while rank 1 called all_gather(float16, 16 bytes)"),
        ("CollectiveError", "all_gather(float16, 16 bytes) while rank 0 called all_gather(float32, 16 bytes)"),
    ),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_ranks_that_disagree_fail_at_once_on_every_rank(pools, case):
    results = pools.get(2).run(run_split_case, case, timeout=ANSWER_S)
    for rank, ((kind, text), got) in enumerate(zip(SPLIT_CASES[case], results)):
        assert got["call"].startswith(kind + ":") and text in got["call"], (rank, got["call"])
        # The ranks diverged: the group's shared memory stays failed instead of pairing later calls wrongly.
        assert got["after"].startswith("CollectiveError") and "unusable after an earlier failure" in got["after"], (
            rank,
            got["after"],
        )


def run_agreeing_calls_off_shared_memory() -> dict:
    """Every rank leaves shared memory the same way: the announcements agree and the group stays healthy."""
    group = dist.new_group([0, 1])
    rank = dist.get_rank()
    with comm.record_collectives() as log:
        integers = comm.all_reduce(torch.full((5,), rank + 1, dtype=torch.int64), group=group)
        flags = comm.all_gather(torch.tensor([rank == 0]), dim=0, group=group)
    refused = [
        _outcome(lambda: comm.all_reduce(torch.ones(1).expand(4), group=group)),
        _outcome(lambda: comm.all_gather(torch.ones(2), dim=3, group=group)),
    ]
    floats = comm.all_reduce(torch.full((3,), float(rank + 1)), group=group)
    return {
        "integers": integers.tolist(),
        "flags": flags.tolist(),
        "engines": [engine for _, engine, _ in log.calls],
        "refused": refused,
        "floats": floats.tolist(),
    }


def test_ranks_that_agree_to_leave_shared_memory_keep_a_working_group(pools):
    for got in pools.get(2).run(run_agreeing_calls_off_shared_memory, timeout=ANSWER_S):
        assert got["integers"] == [3] * 5 and got["flags"] == [True, False]
        assert got["engines"] == ["torch", "torch"]
        assert got["refused"][0].startswith("InputShapeError") and "elements share memory" in got["refused"][0]
        assert got["refused"][1].startswith("InputShapeError") and "dim 3 is out of range" in got["refused"][1]
        assert got["floats"] == [3.0] * 3  # then shared memory serves the group as before


def run_calls_on_groups_this_rank_cannot_use() -> dict:
    rank = dist.get_rank()
    only_rank_0 = dist.new_group([0])
    outcomes = {"list of ranks": _outcome(lambda: comm.all_reduce(torch.ones(2), group=[0, 1]))}
    if rank == 1:
        outcomes["not a member"] = _outcome(lambda: comm.all_reduce(torch.ones(2), group=only_rank_0))
        outcomes["not a member (barrier)"] = _outcome(lambda: comm.barrier(group=only_rank_0))
    destroyed = dist.new_group([0, 1])
    comm.all_reduce(torch.ones(2), group=destroyed)  # shared memory set up and cached for it
    dist.destroy_process_group(destroyed)
    outcomes["destroyed"] = _outcome(lambda: comm.all_reduce(torch.ones(2), group=destroyed))
    return outcomes


def test_calls_on_a_group_this_rank_cannot_use_raise_typed_errors(pools):
    rank_0, rank_1 = pools.get(2).run(run_calls_on_groups_this_rank_cannot_use, timeout=ANSWER_S)
    for got in (rank_0, rank_1):
        assert got["list of ranks"].startswith("CollectiveError") and "ProcessGroup" in got["list of ranks"]
        assert got["destroyed"].startswith("CollectiveError") and "destroyed" in got["destroyed"], got["destroyed"]
    for key in ("not a member", "not a member (barrier)"):
        assert rank_1[key].startswith("CollectiveError"), rank_1[key]
        assert "global rank 1 is not a member of this process group" in rank_1[key], rank_1[key]

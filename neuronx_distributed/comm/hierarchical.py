"""Hierarchical collectives for a group whose ranks sit on several hosts, several ranks on each.

Each host holds k ranks of the group; its ranks are the group's "local" sub-group (shared
memory) and the ranks with the same local index on every host form an "across" sub-group
(torch.distributed, gloo). An all-reduce is a shared-memory reduce-scatter inside each host
(local rank l keeps the host's sum of slice l), a gloo all-reduce of slice l among the
local-index-l ranks of all hosts (1/k of the data each, all k of them at once), and a
shared-memory all-gather of the k slices. Every rank of the group ends with the same bytes:
each slice is reduced once, by one gloo call, and copied everywhere from there.

The all-reduce runs in place: the reduce-scatter writes each rank's slice of the caller's tensor,
gloo reduces that slice in place, and the all-gather is one shared-memory broadcast from each
local rank straight into the tensor. When k does not divide the count, the last count % k
elements are reduced inside the host by one shared-memory all-reduce and cross hosts at the end of
the last local rank's slice, in the same gloo call (on 2 simulated nodes x 2 ranks on 2 cores,
2026-12, 7 elements took as long as 8, where a second round of all three steps on a padded
buffer cost 1.4-2.3 ms more per call). No
pipelining of pieces: with the cores busy, gloo's worker thread and the shared-memory steps
compete for them, and pipelined pieces took 29-30 ms for 25 MB and 112 ms for 100 MB where one
piece took 27 and 105 (same machine).

`reduce_scatter`, `all_gather` and `broadcast` take the same two levels; `barrier` is the
agreement below. Tensors that shared memory does not run (other dtypes) go to
torch.distributed over the whole group (`AgreeingTorchEngine`).

Before any data moves, every collective of the group (on either engine, or refused by
`comm` for bad input) runs `agree`: a shared-memory max of the call's description inside
each host; then local rank 0 of each host all-gathers its host's result with the other
hosts' over gloo, while the host's other ranks wait, and hands them the verdict in one
shared-memory broadcast. (On 2 simulated nodes x 2 ranks on a quiet machine, 2026-12: 1.2-1.4
ms per call against 2.2-2.6 ms when every across sub-group ran a gloo max, and 60% of the CPU
time; a gloo all-gather of a few float64 took 0.5 ms there, an all-reduce 0.8 ms.) Ranks that
issue different calls (a size, dtype, op or root that differs, a dtype that sends one rank
to torch.distributed, an input that one rank refuses) all raise CollectiveError naming
every rank's call, at once and with nothing changed, and the group stays usable.

`HostLayout` and `set_up` decide whether a group is served this way; `comm.groups` calls
them when the group is set up, after its ranks have exchanged their host identities.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.dlpack import to_dlpack

from ..errors import CollectiveError, NeuronxDistributedError
from .engine import TorchEngine, _all_gather_single
from .native import _C
from .shm import ShmEngine, op_name, runs
from .shm_groups import DEFAULT_SLOT_BYTES, GroupRegistry

# /dev/shm that each host's local segment takes (two sets of k slots). Every shared-memory step is a
# rendezvous of the host's ranks; with more ranks than cores (2 simulated nodes x 2 ranks on 2
# cores, 2026-12) each costs context switches, and the in-place reduce-scatter of 25 MB took 20 ms
# with 16 MiB slots against 40 ms with the 1 MiB slots of a one-host group (same run; 16-24 ms
# with 8 MiB). 32 MiB (8 MiB slots for 2 ranks per host) fits beside the one-host groups in a
# container's default 64 MB /dev/shm.
LOCAL_SEGMENT_BYTES = 32 << 20

_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier")
_ENGINES = ("hierarchical", "torch")
_OPS = (dist.ReduceOp.SUM, dist.ReduceOp.MAX)


def local_slot_bytes(k: int) -> int:
    """Bytes per rank and step of the local segment of a host with k ranks (a multiple of 4096)."""
    return max(DEFAULT_SLOT_BYTES, LOCAL_SEGMENT_BYTES // (2 * k) // 4096 * 4096)


@dataclass(frozen=True)
class HostLayout:
    """Where a group's ranks run: `hosts[h]` is the global ranks on host h, ascending (the order of
    the sub-groups that `new_group` creates); hosts in the order of their first group rank."""

    hosts: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, global_ranks: list[int], identities: list) -> HostLayout:
        """The layout of a group from its ranks' host identities (`shm_groups.host_identity`)."""
        by_host: dict = {}
        for rank, identity in zip(global_ranks, identities):
            by_host.setdefault(identity, []).append(rank)
        return cls(tuple(tuple(sorted(members)) for members in by_host.values()))

    @property
    def local_size(self) -> int:
        """Ranks per host (the first host's count; `hierarchical` says whether all hosts agree)."""
        return len(self.hosts[0])

    @property
    def hierarchical(self) -> bool:
        """Whether the two-level collectives serve this layout: several hosts, the same number (> 1)
        of ranks on each. (Other layouts run on torch.distributed over the whole group.)"""
        return len(self.hosts) > 1 and self.local_size > 1 and all(len(host) == self.local_size for host in self.hosts)

    def place(self, global_rank: int) -> tuple[int, int]:
        """(host, local index) of a rank."""
        return next((h, members.index(global_rank)) for h, members in enumerate(self.hosts) if global_rank in members)


@dataclass(frozen=True)
class Call:
    """What one rank is about to run: compared across the group by `HierarchicalEngine.agree`."""

    collective: str
    engine: str
    dtype: torch.dtype | None
    count: int
    op: dist.ReduceOp = dist.ReduceOp.SUM
    root: int = -1
    refusal: str | None = None  # this rank's error for its input, if it raises instead

    def encoded(self) -> torch.Tensor:
        """The fields as float64 (each exact: small integers and crc32s), for a max over the group."""
        dtype_code = zlib.crc32(str(self.dtype).encode()) if self.dtype is not None else -1
        return torch.tensor(
            [_COLLECTIVES.index(self.collective), _ENGINES.index(self.engine), dtype_code, self.count,
             _OPS.index(self.op), self.root, self.refusal is not None],
            dtype=torch.float64,
        )  # fmt: skip

    def describe(self) -> str:
        if self.refusal is not None:
            return f"refused its input of {self.collective} ({self.refusal})"
        if self.collective == "barrier":
            return "barrier"
        what = f"{self.collective} of {self.count} {str(self.dtype).removeprefix('torch.')} elements"
        if self.collective in ("all_reduce", "reduce_scatter"):
            what += f" ({('sum', 'max')[_OPS.index(self.op)]})"  # a peer's op arrives unpickled, as RedOpType
        if self.collective == "broadcast":
            what += f" from group rank {self.root}"
        return what + f" on the {self.engine} engine"


class HierarchicalEngine:
    """The two-level collectives of one group (see the module docstring) for CPU tensors that
    shared memory runs; `engine_for` gives the engine of any other CPU tensor."""

    name = "hierarchical"

    def __init__(self, group: dist.ProcessGroup, local: ShmEngine, across: TorchEngine, layout: HostLayout):
        self.whole, self.local, self.across = TorchEngine(group), local, across
        self._layout, self._k, self._hosts = layout, layout.local_size, len(layout.hosts)
        _, self.local_index = layout.place(dist.get_rank())
        # The across sub-group's rank of each host (new_group orders a group's ranks by global rank).
        across_ranks = dist.get_process_group_ranks(across.group)
        self._across_rank_of_host = [across_ranks.index(members[self.local_index]) for members in layout.hosts]
        host_of_across_rank = sorted(range(self._hosts), key=self._across_rank_of_host.__getitem__)
        # _order[l * hosts + a]: the group rank with local index l on the host of across rank a. Rows
        # laid out in this order split into k contiguous blocks, block l holding the rows of local
        # rank l's across sub-group in that sub-group's rank order.
        self._order = torch.tensor(
            [dist.get_group_rank(group, layout.hosts[h][l]) for l in range(self._k) for h in host_of_across_rank],
            dtype=torch.long,
        )
        self._torch = AgreeingTorchEngine(self)

    def engine_for(self, tensor: torch.Tensor):
        """This engine for what shared memory runs; torch.distributed (agreed first) for other CPU tensors."""
        return self if runs(tensor) else self._torch

    def agree(self, call: Call) -> None:
        """Return once every rank of the group has entered `agree` with the same call; otherwise raise
        on every rank: this rank's own error if it refused its input, else CollectiveError naming
        each rank's call. Collective over the group, like a barrier."""
        fields = call.encoded()
        bounds = torch.cat([fields, -fields])  # after a max: the host's largest and (negated) smallest
        self._local_call("all_reduce", to_dlpack(bounds), "max")
        verdict = torch.zeros(1, dtype=torch.float64)
        if self.local_index == 0:  # the host's other ranks wait for its verdict in shared memory
            verdict[0] = self._hosts_agree(bounds.tolist())
        self._local_call("broadcast", to_dlpack(verdict), 0)
        if verdict[0]:
            return
        self._raise_disagreement(call)

    def _hosts_agree(self, bounds: list[float]) -> bool:
        """On local rank 0 of each host, from its host's `bounds`: whether every rank of the group
        issued the same call. One gloo all-gather among the hosts' local ranks 0."""
        half = len(bounds) // 2
        largest, host_differs = bounds[:half], bounds[:half] != [-value for value in bounds[half:]]
        hosts = torch.empty(self._hosts, half + 1, dtype=torch.float64)
        _all_gather_single(hosts.view(-1), torch.tensor([*largest, host_differs], dtype=torch.float64),
                           group=self.across.group)  # fmt: skip
        # No host's ranks differ (so each host's largest is its one call) and every host issued the same one.
        return all(row == [*largest, False] for row in hosts.tolist())

    def _raise_disagreement(self, call: Call) -> None:
        calls = [None] * self.whole.group.size()
        dist.all_gather_object(calls, call, group=self.whole.group)
        ranks = dist.get_process_group_ranks(self.whole.group)
        refusals = [f"global rank {rank} {peer.describe()}" for rank, peer in zip(ranks, calls) if peer.refusal]
        if refusals:
            if call.refusal is not None:
                return  # the caller raises this rank's own error
            raise CollectiveError(
                f"{'; '.join(refusals)}, so every rank of the group of global ranks {ranks} raises instead of "
                f"running its {call.collective}; fix the input on that rank."
            )
        by_call: dict[Call, list[int]] = {}
        for rank, peer in zip(ranks, calls):
            by_call.setdefault(peer, []).append(rank)
        described = "; ".join(f"global ranks {members}: {peer.describe()}" for peer, members in by_call.items())
        raise CollectiveError(
            f"the ranks of the group of global ranks {ranks} issued different collectives ({described}); every rank "
            "of a group must issue the same collectives in the same order, with the same sizes, dtypes and ops "
            "(a dtype that shared memory does not run sends a rank to torch.distributed)."
        )

    def announce_refusal(self, collective: str, count: int, op, root: int, error: NeuronxDistributedError):
        """Tell every peer that this rank raises `error` for its input of `collective`, then raise it."""
        self.agree(Call(collective, self.name, None, count, op, root, refusal=f"{type(error).__name__}: {error}"))
        raise error

    def all_reduce_(self, tensor, op):
        self.agree(Call("all_reduce", self.name, tensor.dtype, tensor.numel(), op))
        flat, name = tensor.view(-1), op_name(op)
        k, n = self._k, tensor.numel() // self._k
        # Local rank l's slice is flat[l * n : (l + 1) * n]; the last one runs on over the count % k left.
        slices = [flat[l * n : (l + 1) * n] for l in range(k - 1)] + [flat[(k - 1) * n :]]
        if k * n < len(flat):  # those: reduced inside the host first, then across with the last slice
            self._local_call("all_reduce", to_dlpack(flat[k * n :]), name)
        mine = slices[self.local_index]
        if n:  # in place (the C++ reduction's output may alias a source, csrc/reduce_kernels.hpp)
            self._local_call("reduce_scatter", to_dlpack(flat[: k * n].view(k, n)), to_dlpack(mine[:n]), name)
        if len(mine):  # the same length on every rank of this across sub-group (empty only if count < k)
            dist.all_reduce(mine, op=op, group=self.across.group)
        for root, piece in enumerate(slices):
            if len(piece):
                self._local_call("broadcast", to_dlpack(piece), root)

    def reduce_scatter(self, tensor, op):
        self.agree(Call("reduce_scatter", self.name, tensor.dtype, tensor.numel(), op))
        # Block l (the rows of local rank l's across sub-group) is reduced inside the host onto
        # local rank l, then across hosts onto the row's owner.
        blocks = tensor.index_select(0, self._order).view(self._k, self._hosts, *tensor.shape[1:])
        host_partial = self.local.reduce_scatter(blocks, op)  # (hosts, *chunk)
        return self.across.reduce_scatter(host_partial, op)

    def all_gather(self, tensor):
        self.agree(Call("all_gather", self.name, tensor.dtype, tensor.numel()))
        across_rows = self.across.all_gather(tensor)  # (hosts, *shape): this across sub-group's rows
        blocks = self.local.all_gather(across_rows)  # (k, hosts, *shape): every across sub-group's
        out = tensor.new_empty(self._k * self._hosts, *tensor.shape)
        out.index_copy_(0, self._order, blocks.view(-1, *tensor.shape))
        return out

    def broadcast_(self, tensor, group_src):
        self.agree(Call("broadcast", self.name, tensor.dtype, tensor.numel(), root=group_src))
        # The source's across sub-group gets it first, then each host from its rank with the source's local index.
        src_host, src_local = self._layout.place(dist.get_global_rank(self.whole.group, group_src))
        if self.local_index == src_local:
            self.across.broadcast_(tensor, self._across_rank_of_host[src_host])
        self.local.broadcast_(tensor, src_local)

    def barrier(self):
        self.agree(Call("barrier", self.name, None, 0))

    def _local_call(self, name, *args):
        try:
            getattr(self.local.handle, name)(*args)
        except _C.CollectiveFailure as failure:
            raise CollectiveError(str(failure)) from failure


class AgreeingTorchEngine:
    """torch.distributed over the whole group of a `HierarchicalEngine`, each call agreed on first."""

    name = "torch"

    def __init__(self, hierarchical: HierarchicalEngine):
        self._agree, self._torch = hierarchical.agree, hierarchical.whole

    def all_reduce_(self, tensor, op):
        self._agree(Call("all_reduce", self.name, tensor.dtype, tensor.numel(), op))
        self._torch.all_reduce_(tensor, op)

    def all_gather(self, tensor):
        self._agree(Call("all_gather", self.name, tensor.dtype, tensor.numel()))
        return self._torch.all_gather(tensor)

    def reduce_scatter(self, tensor, op):
        self._agree(Call("reduce_scatter", self.name, tensor.dtype, tensor.numel(), op))
        return self._torch.reduce_scatter(tensor, op)

    def broadcast_(self, tensor, group_src):
        self._agree(Call("broadcast", self.name, tensor.dtype, tensor.numel(), root=group_src))
        self._torch.broadcast_(tensor, group_src)

    def barrier(self):
        self._agree(Call("barrier", "hierarchical", None, 0))  # the same barrier as on the engine itself


# Sub-groups by their global ranks, created once per process and shared by every group they serve
# (the world group and a DP group of the same ranks, a group set up again after set_backend).
_subgroups: dict[tuple[int, ...], dist.ProcessGroup] = {}
# The local segments, by slot size (`local_slot_bytes`).
_local_segments: dict[int, GroupRegistry] = {}


def set_up(group: dist.ProcessGroup, layout: HostLayout, timeout_s: float) -> HierarchicalEngine:
    """Create (or reuse) this rank's local and across sub-groups and the local shared-memory segment.

    Collective over `group`: every rank must call it with the same layout, and every rank must
    have created the same number of process groups so far (`subgroup_names_agree`), since
    torch names a group created by its members only from its ranks and that number. If a host
    cannot create its segment, every rank of the group raises its CollectiveError.
    """
    host, local_index = layout.place(dist.get_rank())
    local_group = _subgroup(layout.hosts[host])
    across_group = _subgroup(tuple(sorted(members[local_index] for members in layout.hosts)))
    slot_bytes = local_slot_bytes(layout.local_size)
    failure = None
    try:
        handle = _local_segments.setdefault(slot_bytes, GroupRegistry(slot_bytes)).handle(local_group, timeout_s)
    except CollectiveError as error:  # raised on every rank of the host
        failure = str(error)
    failures = [None] * len(layout.hosts)
    dist.all_gather_object(failures, failure, group=across_group)
    reported = sorted({text for text in failures if text is not None})
    if reported:
        raise CollectiveError(f"the hierarchical engine of the group of global ranks "
                              f"{dist.get_process_group_ranks(group)} cannot run: {' '.join(reported)}")  # fmt: skip
    return HierarchicalEngine(group, ShmEngine(local_group, handle), TorchEngine(across_group), layout)


def subgroup_names_agree(counts: list[int]) -> bool:
    """Whether ranks that created `counts` process groups so far would name new sub-groups alike."""
    return len(set(counts)) == 1


def process_groups_created() -> int:
    """How many process groups this rank is a member of: part of the name torch gives a group
    that only its members create (`new_group(..., use_local_synchronization=True)`)."""
    return len(dist.distributed_c10d._world.pg_names)


def _subgroup(global_ranks: tuple[int, ...]) -> dist.ProcessGroup:
    """A gloo group of `global_ranks`, created by those ranks only (the others of the world may be
    elsewhere), or the live one made earlier."""
    group = _subgroups.get(global_ranks)
    if group is not None:
        try:
            dist.get_process_group_ranks(group)
            return group
        except (KeyError, ValueError, RuntimeError):  # destroyed since (what torch raises for that)
            del _subgroups[global_ranks]
    group = _subgroups[global_ranks] = dist.new_group(list(global_ranks), backend="gloo", use_local_synchronization=True)
    return group

"""Hierarchical collectives for a group whose ranks sit on several hosts, several ranks on each.

Each host holds k ranks of the group; its ranks are the group's "local" sub-group (shared
memory) and the ranks with the same local index on every host form an "across" sub-group
(torch.distributed, gloo). An all-reduce is a shared-memory reduce-scatter inside each host
(local rank l keeps the host's sum of slice l), a gloo all-reduce of slice l among the
local-index-l ranks of all hosts (1/k of the data each, all k of them at once), and a
shared-memory all-gather of the k slices. Every rank of the group ends with the same bytes:
each slice is reduced once, by one gloo call, and copied everywhere from there.

`reduce_scatter`, `all_gather` and `broadcast` take the same two levels; `barrier` runs on
torch.distributed over the whole group. Tensors that shared memory does not run (other
dtypes) go to torch.distributed over the whole group, announced to the host's peers first
(`AnnouncingEngine`), as on a one-host group.

`HostLayout` and `set_up` decide whether a group is served this way; `comm.groups` calls
them when the group is set up, after its ranks have exchanged their host identities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import shm_ops
from .engine import TorchEngine
from .shm import AnnouncingEngine, ShmEngine, runs


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


class HierarchicalEngine:
    """The two-level collectives of one group (see the module docstring) for CPU tensors that
    shared memory runs; `engine_for` gives the engine of any other CPU tensor."""

    name = "hierarchical"

    def __init__(self, group: dist.ProcessGroup, local: ShmEngine, across: TorchEngine, layout: HostLayout):
        self._whole, self._local, self._across = TorchEngine(group), local, across
        self._layout, self._k, self._hosts = layout, layout.local_size, len(layout.hosts)
        _, self._local_index = layout.place(dist.get_rank())
        # The across sub-group's rank of each host (new_group orders a group's ranks by global rank).
        across_ranks = dist.get_process_group_ranks(across.group)
        self._across_rank_of_host = [across_ranks.index(members[self._local_index]) for members in layout.hosts]
        host_of_across_rank = sorted(range(self._hosts), key=self._across_rank_of_host.__getitem__)
        # _order[l * hosts + a]: the group rank with local index l on the host of across rank a. Rows
        # laid out in this order split into k contiguous blocks, block l holding the rows of local
        # rank l's across sub-group in that sub-group's rank order.
        self._order = torch.tensor(
            [dist.get_group_rank(group, layout.hosts[h][l]) for l in range(self._k) for h in host_of_across_rank],
            dtype=torch.long,
        )
        self._announcing = AnnouncingEngine(self._whole, local)

    def engine_for(self, tensor: torch.Tensor):
        """This engine for what shared memory runs; torch.distributed (announced) for other CPU tensors."""
        return self if runs(tensor) else self._announcing

    def all_reduce_(self, tensor, op):
        flat = tensor.view(-1)
        count = flat.numel()
        if count == 0:
            return
        slice_size = -(-count // self._k)
        if count == slice_size * self._k:
            rows = flat.view(self._k, slice_size)
        else:  # zero-padded to k equal slices; the padding is reduced too and dropped
            rows = flat.new_zeros(self._k, slice_size)
            rows.view(-1)[:count].copy_(flat)
        mine = self._local.reduce_scatter(rows, op)  # this host's reduction of slice l
        self._across.all_reduce_(mine, op)  # every host's: slice l is done
        flat.copy_(self._local.all_gather(mine).view(-1)[:count])

    def reduce_scatter(self, tensor, op):
        # Block l (the rows of local rank l's across sub-group) is reduced inside the host onto
        # local rank l, then across hosts onto the row's owner.
        blocks = tensor.index_select(0, self._order).view(self._k, self._hosts, *tensor.shape[1:])
        host_partial = self._local.reduce_scatter(blocks, op)  # (hosts, *chunk)
        return self._across.reduce_scatter(host_partial, op)

    def all_gather(self, tensor):
        across_rows = self._across.all_gather(tensor)  # (hosts, *shape): this across sub-group's rows
        blocks = self._local.all_gather(across_rows)  # (k, hosts, *shape): every across sub-group's
        out = tensor.new_empty(self._k * self._hosts, *tensor.shape)
        out.index_copy_(0, self._order, blocks.view(-1, *tensor.shape))
        return out

    def broadcast_(self, tensor, group_src):
        # The source's across sub-group gets it first, then each host from its rank with the source's local index.
        src_host, src_local = self._layout.place(dist.get_global_rank(self._whole.group, group_src))
        if self._local_index == src_local:
            self._across.broadcast_(tensor, self._across_rank_of_host[src_host])
        self._local.broadcast_(tensor, src_local)

    def barrier(self):
        self._whole.barrier()


# Sub-groups by their global ranks, created once per process and shared by every group they serve
# (the world group and a DP group of the same ranks, a group set up again after set_backend).
_subgroups: dict[tuple[int, ...], dist.ProcessGroup] = {}


def set_up(group: dist.ProcessGroup, layout: HostLayout, timeout_s: float) -> HierarchicalEngine:
    """Create (or reuse) this rank's local and across sub-groups and the local shared-memory segment.

    Collective over `group`: every rank must call it with the same layout, and every rank must
    have created the same number of process groups so far (`subgroup_names_agree`), since
    torch names a group created by its members only from its ranks and that number.
    """
    host, local_index = layout.place(dist.get_rank())
    local_group = _subgroup(layout.hosts[host])
    across_group = _subgroup(tuple(sorted(members[local_index] for members in layout.hosts)))
    local = ShmEngine(local_group, shm_ops.groups.handle(local_group, timeout_s))
    return HierarchicalEngine(group, local, TorchEngine(across_group), layout)


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

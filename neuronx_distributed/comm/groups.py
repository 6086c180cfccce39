"""The engines of each process group: set up once per group, then looked up per call.

`GroupEngines.set_up(group)` is collective over the group: its ranks exchange their engine
setting (`settings.current()`: `set_backend`, NXD_COMM_BACKEND, NXD_COMM_TIMEOUT), their host
and whether they have the compiled extension, and every rank raises the same CommBackendError
if a setting is bad on any rank or the ranks disagree. Then, unless the setting is torch: the
shared-memory segment is created when every rank is on this host, and the hierarchical
engine's sub-groups (`comm.hierarchical`) when the group spans several hosts with the same
number (> 1) of its ranks on each; other groups run on torch.distributed. The engine for each
(device, dtype) is decided once, at its first call, and cached.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from ..errors import CollectiveError, CommBackendError
from . import hierarchical, settings
from .engine import Engine, TorchEngine
from .native import BUILD_HINT, _C
from . import shm_ops
from .shm import AnnouncingEngine, RefusingEngine, ShmEngine, ShmOpEngine, runs
from .shm_groups import host_identity


class GroupEngines:
    """The engines of one process group; `decisions` counts the (device, dtype) engine choices made."""

    def __init__(self, group: dist.ProcessGroup, backend: str, shm_handle=None, hierarchical_engine=None):
        self.group = group
        self.backend = backend
        self.size = group.size()
        # Global rank -> group rank, in group-rank order.
        self.group_rank_of = {rank: index for index, rank in enumerate(dist.get_process_group_ranks(group))}
        self.torch = TorchEngine(group)
        self.shm = ShmEngine(group, shm_handle) if shm_handle is not None else None
        self._shm_ops = ShmOpEngine(group) if shm_handle is not None else None
        self.hierarchical = hierarchical_engine
        # By dtype for CPU tensors; by (device, dtype) for others (hashing a torch.device costs more).
        self._chosen_cpu: dict[torch.dtype, Engine] = {}
        self._chosen: dict[tuple[torch.device, torch.dtype], Engine] = {}
        self.decisions = 0

    @classmethod
    def set_up(cls, group: dist.ProcessGroup) -> GroupEngines:
        """Agree on the group's engine setting with its peers and set the engines up (collective)."""
        try:
            backend, timeout_s = settings.current()
            problem = None
        except CommBackendError as error:
            backend, timeout_s, problem = None, None, str(error)
        if group.size() == 1:
            if problem is not None:
                raise CommBackendError(problem)
            return cls(group, backend)
        mine = {
            "backend": backend,
            "problem": problem,
            "host": host_identity(),
            "extension": _C is not None,
            "process_groups": hierarchical.process_groups_created(),
        }
        every = [None] * group.size()
        dist.all_gather_object(every, mine, group=group)
        ranks = dist.get_process_group_ranks(group)
        _require_agreement(every, ranks)
        if backend == "torch":
            return cls(group, backend)
        hosts = {peer["host"] for peer in every}
        lacking = [rank for rank, peer in zip(ranks, every) if not peer["extension"]]
        if lacking or None in hosts or len(hosts) > 1:
            if backend == "shm":
                why = (
                    f"global ranks {lacking} lack the compiled extension ({BUILD_HINT})"
                    if lacking
                    else "its ranks are not all on one host"
                )
                raise CommBackendError(
                    f"the backend is shm, but shared memory cannot serve the group of global ranks {ranks}: {why}; "
                    'call comm.set_backend("auto") (or set NXD_COMM_BACKEND=auto) to use torch.distributed there '
                    "(with shared memory inside each host when every host holds the same number of its ranks)."
                )
            if not lacking and None not in hosts:
                layout = hierarchical.HostLayout.of(ranks, [peer["host"] for peer in every])
                created = [peer["process_groups"] for peer in every]
                if layout.hierarchical and hierarchical.subgroup_names_agree(created):
                    return cls(group, backend, hierarchical_engine=hierarchical.set_up(group, layout, timeout_s))
            return cls(group, backend)
        return cls(group, backend, shm_ops.groups.handle(group, timeout_s))

    def engine_for(self, tensor: torch.Tensor) -> Engine:
        """The eager engine for `tensor`'s device and dtype, decided at the first call for them."""
        if tensor.is_cpu:
            chosen, key = self._chosen_cpu, tensor.dtype
        else:
            chosen, key = self._chosen, (tensor.device, tensor.dtype)
        engine = chosen.get(key)
        if engine is None:
            engine = chosen[key] = self._decide(tensor)
            self.decisions += 1
        return engine

    def traced_engine_for(self, tensor: torch.Tensor) -> Engine:
        """The engine whose calls torch.compile / torch.export record: the custom ops instead of the
        bound C++ calls, torch.distributed as is, and no announcements (the peers trace alike)."""
        if self.shm is not None and runs(tensor):
            return self._shm_ops
        if self.backend == "shm":
            raise _refusal(tensor)
        return self.torch

    def _decide(self, tensor: torch.Tensor) -> Engine:
        if self.hierarchical is not None and tensor.device.type == "cpu":
            return self.hierarchical.engine_for(tensor)
        if self.shm is not None and runs(tensor):
            return self.shm
        if self.backend == "shm":
            # Whether shared memory serves the group depends on the group alone (and the tensor being on
            # CPU, which all ranks of a call share), never on this rank's dtype: every rank announces alike.
            return RefusingEngine(_refusal(tensor), self.shm if tensor.device.type == "cpu" else None)
        if self.shm is not None and tensor.device.type == "cpu":
            return AnnouncingEngine(self.torch, self.shm)
        return self.torch


def _refusal(tensor: torch.Tensor) -> CollectiveError:
    return CollectiveError(
        f"the backend is shm but the shared-memory engine cannot run this collective (a {tensor.device.type} tensor "
        f"of {tensor.dtype}; it needs CPU tensors of float32, float64, bfloat16 or float16); call "
        'comm.set_backend("auto") or ("torch"), and unset NXD_COMM_BACKEND or set it to auto or torch.'
    )


def _require_agreement(every: list[dict], ranks: list[int]) -> None:
    """Raise the same CommBackendError on every rank if a setting is bad anywhere or the ranks differ."""
    problems = [f"global rank {rank}: {peer['problem']}" for rank, peer in zip(ranks, every) if peer["problem"]]
    if problems:
        raise CommBackendError("; ".join(problems))
    by_backend = defaultdict(list)
    for rank, peer in zip(ranks, every):
        by_backend[peer["backend"]].append(rank)
    if len(by_backend) > 1:
        described = "; ".join(f"{backend} on global ranks {members}" for backend, members in by_backend.items())
        raise CommBackendError(
            f"the ranks of the group of global ranks {ranks} were set up with different comm backends ({described}); "
            "call comm.set_backend(...) alike on every rank, and give every rank the same NXD_COMM_BACKEND."
        )

"""Per-process-group shared-memory segments: created when `comm.groups` sets a group up, then cached.

Creation is collective over the group (through torch.distributed), once its ranks know they
share this host (`host_identity`): group rank 0 creates a segment under a fresh random name,
the others attach to it, and the name leaves /dev/shm as soon as every rank has mapped it,
so nothing is left behind however the job ends.
"""

from __future__ import annotations

import os
import secrets
import socket

import torch.distributed as dist

from ..errors import CollectiveError
from .native import _C

# Bytes each rank stages per step; a collective on more data runs in chunks of this size.
DEFAULT_SLOT_BYTES = 1 << 20


def host_identity() -> tuple | None:
    """What ranks must share to share memory: host, boot, IPC namespace and user; None off Linux."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            boot = boot_id.read().strip()
        ipc_namespace = os.readlink("/proc/self/ns/ipc")
    except OSError:
        return None
    return (socket.gethostname(), boot, ipc_namespace, os.getuid())


class GroupRegistry:
    """The shared-memory handle of every process group this process has set up, by group name."""

    def __init__(self, slot_bytes: int = DEFAULT_SLOT_BYTES):
        self.slot_bytes = slot_bytes
        self._entries: dict[str, tuple[dist.ProcessGroup, _C.ShmGroup]] = {}

    def handle(self, group: dist.ProcessGroup, timeout_s: float) -> _C.ShmGroup:
        """The group's handle, created on first use (collective; every rank must be on this host)."""
        entry = self._entries.get(group.group_name)
        # A destroyed and re-created world may reuse a group name: only the same object matches.
        if entry is None or entry[0] is not group:
            self._forget_destroyed_groups()
            entry = self._entries[group.group_name] = (group, self._create(group, timeout_s))
        entry[1].timeout = timeout_s
        return entry[1]

    def _forget_destroyed_groups(self) -> None:
        """Unmap the segments of groups that torch.distributed has destroyed since."""
        for name, (group, _) in list(self._entries.items()):
            try:
                dist.get_process_group_ranks(group)
            except (KeyError, ValueError, RuntimeError):  # what torch raises for a destroyed group
                del self._entries[name]

    def handle_by_name(self, group_name: str) -> _C.ShmGroup:
        """The handle of a group already set up by `handle`; used by the custom ops."""
        entry = self._entries.get(group_name)
        if entry is None:
            raise CollectiveError(
                f"process group {group_name!r} has no shared-memory segment; call the collective "
                "through neuronx_distributed.comm so that the group is set up first."
            )
        return entry[1]

    def set_timeout(self, seconds: float) -> None:
        """Seconds a rank waits for its peers before a collective fails, for every group set up so far."""
        for _, handle in self._entries.values():
            handle.timeout = seconds

    def _create(self, group: dist.ProcessGroup, timeout_s: float) -> _C.ShmGroup:
        ranks = dist.get_process_group_ranks(group)
        rank = dist.get_rank(group)
        handle, failure = None, None
        if rank == 0:
            # create() first removes segments orphaned by earlier jobs killed during set-up.
            name = _C.segment_name(secrets.token_hex(8))
            try:
                handle = _C.ShmGroup.create(name, 0, ranks, self.slot_bytes, timeout_s)
            except (_C.SegmentError, ValueError) as error:
                name, failure = None, str(error)
            shared = [name]
        else:
            shared = [None]
        dist.broadcast_object_list(shared, src=ranks[0], group=group)
        if rank != 0 and shared[0] is not None:
            try:
                handle = _C.ShmGroup.attach(shared[0], rank, ranks, self.slot_bytes, timeout_s)
            except (_C.SegmentError, ValueError) as error:
                failure = str(error)
        failures = [None] * len(ranks)
        dist.all_gather_object(failures, failure, group=group)
        reported = [f"rank {r}: {text}" for r, text in enumerate(failures) if text is not None]
        if reported:
            raise CollectiveError(
                f"could not set up shared memory for the group of global ranks {ranks}: {'; '.join(reported)}. "
                "Free space in /dev/shm or call comm.set_backend(\"torch\") (or set NXD_COMM_BACKEND=torch)."
            )
        handle.wait_for_peers()
        return handle

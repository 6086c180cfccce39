"""What a worker does before serving calls: trace its shard, or load it from a saved traced model.

A job is built by the caller, pickled to the worker, and run there once its
process group and parallel_state exist. It returns the worker's `Shard`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TraceError, TraceFunctionError
from .exporting import collective_ops, export_shard, group_ranks, known_groups
from .signature import OutputLayout


@dataclass
class Shard:
    """A worker's exported program and what the caller needs to know about it."""

    program: torch.export.ExportedProgram
    outputs: OutputLayout
    collectives: dict[str, list[str]]  # op -> names of the groups it uses
    groups: dict[str, list[int]]  # group name -> global ranks


@dataclass
class TraceJob:
    """Build the model with `func()` in the worker and export it for the example inputs."""

    func: object
    args: tuple
    kwargs: dict

    def run(self) -> Shard:
        model = self.func()
        if not isinstance(model, torch.nn.Module):
            raise TraceFunctionError(f"func must return a torch.nn.Module, it returned a {type(model).__name__}.")
        program, outputs = export_shard(model, self.args, self.kwargs)
        collectives = collective_ops(program)
        return Shard(program, outputs, collectives, group_ranks(collectives))


@dataclass
class LoadJob:
    """Load this rank's exported program and recreate the process groups its collectives name."""

    program_path: str
    outputs: OutputLayout
    groups: dict[str, list[int]]

    def run(self) -> Shard:
        from .. import comm  # registers the nxd:: collective ops before the program that uses them loads

        program = torch.export.load(self.program_path)
        collectives = collective_ops(program)
        recreated = known_groups()
        for name, ranks in self.groups.items():
            group = recreated.get(name)
            if group is None or torch.distributed.get_process_group_ranks(group) != ranks:
                raise TraceError(
                    f"the saved program's collectives use process group {name!r} of ranks {ranks}, which this "
                    "load did not recreate under that name; trace and save the model again with this version."
                )
            if any(op.startswith("nxd.") for op in collectives):
                # Set up the group's shared-memory segment (collective over the group) before the first call.
                comm.ShmEngine().supports(torch.empty(0), group)
        return Shard(program, self.outputs, collectives, self.groups)

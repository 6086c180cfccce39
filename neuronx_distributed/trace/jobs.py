"""What a worker does before serving calls: trace its shard, or load it from a saved traced model.

A job is built by the caller, pickled to the worker, and run there once its
process group and parallel_state exist. It returns the worker's `Shard`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export.graph_signature import InputKind

from ..errors import TraceError, TracedModelCorruptError, TraceFunctionError
from .artifact import RankRecord, read_rank_file
from .exporting import alias_names, check_aliases, collective_ops, export_shard, group_ranks, known_groups
from .signature import InputSignature, OutputLayout, TensorSpec


@dataclass
class Shard:
    """A worker's exported program and what the caller needs to know about it."""

    program: torch.export.ExportedProgram
    outputs: OutputLayout
    collectives: dict[str, list[str]]  # op -> names of the groups it uses
    groups: dict[str, list[int]]  # group name -> global ranks
    io_aliases: dict[str, int]  # program state name -> index of the output copied into it after each call


@dataclass
class TraceJob:
    """Build the model with `func()` in the worker and export it for the example inputs.

    `func()` returns the model, or `(model, io_aliases)` as upstream 0.2+ allows.
    """

    func: object
    args: tuple
    kwargs: dict

    def run(self) -> Shard:
        built = self.func()
        model, aliases = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
        if not isinstance(model, torch.nn.Module):
            raise TraceFunctionError(
                f"func must return a torch.nn.Module or (module, io_aliases), it returned a {type(built).__name__}."
            )
        program, outputs = export_shard(model, self.args, self.kwargs)
        io_aliases = alias_names(model, aliases, outputs)
        collectives = collective_ops(program)
        return Shard(program, outputs, collectives, group_ranks(collectives), io_aliases)


@dataclass
class LoadJob:
    """Load this rank's exported program, check it against the manifest, recreate the groups its collectives name.

    The file is read once into memory and checked there (size, sha256, archive
    content: `artifact.read_rank_file`); torch loads exactly those bytes.
    """

    load_dir: str
    record: RankRecord
    inputs: InputSignature
    outputs: OutputLayout
    io_aliases: dict[str, int]

    def run(self) -> Shard:
        from .. import comm  # registers the nxd:: collective ops before the program that uses them loads

        where = f"{os.path.join(self.load_dir, self.record.file)!r}"
        program = load_program(read_rank_file(Path(self.load_dir), self.record), where)
        _check_program_matches(program, self.inputs, self.outputs, where)
        collectives = collective_ops(program)
        if collectives != self.record.collectives:
            raise TracedModelCorruptError(
                f"{where} runs the collectives {collectives}, the manifest records {self.record.collectives}; "
                "the files and the manifest come from different saves. Save the model again."
            )
        recreated = known_groups()
        for name, ranks in self.record.groups.items():
            group = recreated.get(name)
            if group is None or torch.distributed.get_process_group_ranks(group) != ranks:
                raise TraceError(
                    f"the saved program's collectives use process group {name!r} of ranks {ranks}, which this "
                    "load did not recreate under that name; trace and save the model again with this version."
                )
            if any(op.startswith("nxd.") for op in collectives):
                # Set up the group's shared-memory segment (collective over the group) before the first call.
                comm.set_up(group)
        check_aliases(program, self.io_aliases, self.outputs, where)
        return Shard(program, self.outputs, collectives, self.record.groups, self.io_aliases)


def load_program(data: bytes, where: str) -> torch.export.ExportedProgram:
    """The program in `data`, an archive that `read_rank_file` checked; TracedModelCorruptError if torch cannot read it."""
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - whatever torch raises on a damaged graph
        raise TracedModelCorruptError(
            f"{where} passed its checks but torch.export.load cannot read it ({type(error).__name__}: {error}); "
            "it was written by another torch version or damaged. Trace and save the model again."
        ) from error


def _check_program_matches(program, inputs: InputSignature, outputs: OutputLayout, where: str) -> None:
    """The program takes and returns the tensors the manifest says (the arena is laid out from the manifest)."""
    user_inputs = {spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder" and node.name in user_inputs]
    actual_inputs = [_spec_of(node) for node in placeholders]
    actual_outputs = [_spec_of(node) for node in program.graph.output_node().args[0]]
    for kind, actual, recorded in (("inputs", actual_inputs, inputs.specs), ("outputs", actual_outputs, list(outputs.specs))):
        if actual != recorded:
            raise TracedModelCorruptError(
                f"{where} takes/returns {kind} {[(s.shape, str(s.dtype)) for s in actual]}, the manifest records "
                f"{[(s.shape, str(s.dtype)) for s in recorded]}; the files and the manifest do not belong together. "
                "Save the model again."
            )


def _spec_of(node) -> TensorSpec | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    return TensorSpec(tuple(int(size) for size in value.shape), value.dtype)

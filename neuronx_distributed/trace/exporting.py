"""Worker side: trace a model shard with torch.export and find the collectives in the program.

The model is wrapped so that the exported program returns a flat tuple of tensors;
the structure of the model's own output travels separately (`signature.OutputLayout`),
so the program never refers to the model's output classes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from ..errors import TraceError
from ..parallel_layers import parallel_state
from .signature import OutputLayout, TensorSpec, flatten_outputs


class _FlatOutputs(nn.Module):
    """Calls the model and returns its output tensors as a tuple, keeping the structure aside."""

    def __init__(self, model: nn.Module, structures: list):
        super().__init__()
        self.model = model
        self.structures = structures  # export restores module attributes afterwards: keep a reference outside

    def forward(self, *args, **kwargs):
        tensors, structure = flatten_outputs(self.model(*args, **kwargs))
        self.structures.append(structure)
        return tuple(tensors)


def export_shard(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.export.ExportedProgram, OutputLayout]:
    """Export `model` (in eval mode) for these example inputs; return the program and its output layout."""
    _set_up_collective_engines()
    structures: list = []
    wrapper = _FlatOutputs(model.eval(), structures)
    with torch.no_grad():
        program = torch.export.export(wrapper, args, kwargs, strict=False)
    output_specs = tuple(
        TensorSpec(tuple(int(size) for size in node.meta["val"].shape), node.meta["val"].dtype)
        for node in program.graph.output_node().args[0]
    )
    program.example_inputs = None  # not needed to run or reload, and would be stored as a pickle
    return program, OutputLayout(output_specs, structures[-1])


def _set_up_collective_engines() -> None:
    """Choose (and set up: collective over the group) each group's engine now, outside tracing.

    Setting up the shared-memory engine exchanges Python objects between ranks,
    which cannot run under torch.export's fake tensors.
    """
    for group in known_groups().values():
        if dist.get_world_size(group) > 1:
            comm.engine_for(torch.empty(0), group)


def collective_ops(program: torch.export.ExportedProgram) -> dict[str, list[str]]:
    """Every collective op in the program (an op with a `group_name` argument), with the groups it uses."""
    found: dict[str, set[str]] = {}
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for position, argument in enumerate(schema.arguments):
            if argument.name == "group_name":
                value = node.kwargs.get("group_name", node.args[position] if position < len(node.args) else None)
                found.setdefault(str(node.target), set()).add(str(value))
    return {op: sorted(groups) for op, groups in sorted(found.items())}


def known_groups() -> dict[str, dist.ProcessGroup]:
    """The process groups a worker can recreate: the world and parallel_state's TP and DP groups, by name."""
    groups = [
        dist.group.WORLD,
        parallel_state.get_tensor_model_parallel_group(),
        parallel_state.get_data_parallel_group(),
    ]
    return {group.group_name: group for group in groups}


def group_ranks(ops: dict[str, list[str]]) -> dict[str, list[int]]:
    """The ranks of every group the program's collectives name; raises for a group workers cannot recreate."""
    known = known_groups()
    used = sorted({name for names in ops.values() for name in names})
    unknown = [name for name in used if name not in known]
    if unknown:
        raise TraceError(
            f"the traced program's collectives use process group(s) {unknown}, which are not the world, "
            "tensor-parallel or data-parallel group; build the model with the parallel layers (or pass "
            "parallel_state's groups to your collectives) so a loaded model can recreate them."
        )
    return {name: dist.get_process_group_ranks(known[name]) for name in used}

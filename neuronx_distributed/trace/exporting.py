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
from ..errors import TraceError, TracedModelCorruptError, TraceFunctionError
from ..parallel_layers import parallel_state
from .signature import OutputLayout, TensorSpec, flatten_outputs


_WRAPPED = "model"  # the attribute of _FlatOutputs that holds the model


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
    wrapper = _FlatOutputs(model.eval(), structures)  # its state names start with _WRAPPED
    with torch.no_grad():
        program = torch.export.export(wrapper, args, kwargs, strict=False)
    output_specs = tuple(
        TensorSpec(tuple(int(size) for size in node.meta["val"].shape), node.meta["val"].dtype)
        for node in program.graph.output_node().args[0]
    )
    program.example_inputs = None  # not needed to run or reload, and would be stored as a pickle
    return program, OutputLayout(output_specs, structures[-1])


def alias_names(model: nn.Module, io_aliases, outputs: OutputLayout) -> dict[str, int]:
    """`io_aliases` ({parameter or buffer of `model`: output index}) by the names the exported program gives them."""
    if not io_aliases:
        return {}
    if not isinstance(io_aliases, dict):
        raise TraceFunctionError(
            f"func returned (model, io_aliases) with a {type(io_aliases).__name__}; io_aliases maps the model's "
            "parameters or buffers to output indices ({tensor: int}), or is None."
        )
    states = {id(tensor): f"{_WRAPPED}.{name}" for name, tensor in
              [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    names = {}
    for tensor, index in io_aliases.items():
        name = states.get(id(tensor))
        if name is None:
            raise TraceFunctionError(
                "an io_aliases key is not a parameter or buffer of the model func returned; alias the model's own "
                "state tensors (e.g. a registered buffer holding a cache)."
            )
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(outputs.specs):
            raise TraceFunctionError(
                f"io_aliases maps {name.removeprefix(_WRAPPED + '.')!r} to output {index!r}; the model returns "
                f"{len(outputs.specs)} tensor(s), so give an index from 0 to {len(outputs.specs) - 1}."
            )
        if outputs.specs[index] != TensorSpec.of(tensor):
            raise TraceFunctionError(
                f"io_aliases maps {name.removeprefix(_WRAPPED + '.')!r} {tuple(tensor.shape)} {tensor.dtype} to "
                f"output {index}, which is {outputs.specs[index].shape} {outputs.specs[index].dtype}; they must match."
            )
        names[name] = index
    return names


def check_aliases(program: torch.export.ExportedProgram, io_aliases: dict[str, int], outputs: OutputLayout,
                  where: str) -> None:
    """Raise TracedModelCorruptError unless every alias names a state tensor of the program and a matching output."""
    for name, index in io_aliases.items():
        state = program.state_dict.get(name, program.constants.get(name))  # constants: non-persistent buffers
        if state is None or index >= len(outputs.specs) or TensorSpec.of(state) != outputs.specs[index]:
            raise TracedModelCorruptError(
                f"{where}: the manifest's io_aliases entry {name!r} -> output {index} does not match the program's "
                "state tensors and outputs; the files and the manifest do not belong together. Save the model again."
            )


def _set_up_collective_engines() -> None:
    """Choose (and set up: collective over the group) each group's engine now, outside tracing.

    Setting up the shared-memory engine exchanges Python objects between ranks,
    which cannot run under torch.export's fake tensors.
    """
    for group in known_groups().values():
        if dist.get_world_size(group) > 1:
            comm.set_up(group)


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

"""Run an exported program with as little Python per call as possible.

`ExportedProgram.module()` checks the inputs' pytree, shapes and guards on every
call (about 40 us on a CPU core, and more when the worker wakes with cold caches).
A worker's inputs always have the traced shapes (they live in the shared arena),
so it calls the program's graph directly with its parameters, buffers and
constants in signature order. Programs that mutate state or take inputs other
than tensors, parameters, buffers and constants run through `module()` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.export.graph_signature import InputKind, OutputKind


def program_runner(program: torch.export.ExportedProgram) -> tuple[Callable[..., tuple], dict[str, torch.Tensor]]:
    """A function of the user inputs (positional, then keyword in traced order) returning the output tensors,
    and the parameters and buffers it reads, by name (writing into them changes what later calls see)."""
    signature = program.graph_signature
    direct = all(spec.kind == OutputKind.USER_OUTPUT for spec in signature.output_specs) and all(
        spec.kind in (InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
        for spec in signature.input_specs
    )
    if not direct:
        module = program.module()
        states = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
        return (lambda *args, **kwargs: tuple(module(*args, **kwargs))), states  # buffers: non-persistent too
    states = {**program.state_dict, **program.constants}
    graph = program.graph_module
    # Each lifted input in graph order: a state tensor, or None where the next user input goes.
    lifted = [None if spec.kind == InputKind.USER_INPUT else states[spec.target] for spec in signature.input_specs]

    def run(*args, **kwargs):
        user_inputs = iter((*args, *kwargs.values()))
        return graph(*(next(user_inputs) if state is None else state for state in lifted))

    return run, states

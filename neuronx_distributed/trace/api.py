"""The seed's trace API: parallel_model_trace, parallel_model_save, parallel_model_load."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

from ..errors import ParallelSizeError, TraceFunctionError
from .artifact import RankRecord, StagedSave, rank_program_file, read_manifest
from .jobs import LoadJob, TraceJob
from .main_guard import exit_if_spawned_main
from .model import TensorParallelModel
from .signature import InputSignature
from .workers import DEFAULT_CALL_TIMEOUT_S, WorkerGroup, default_threads_per_worker

logger = logging.getLogger(__name__)

# Upstream's Neuron-compiler arguments and their defaults: accepted, and ignored off Neuron.
_NEURON_ONLY_DEFAULTS = {
    "states": None,
    "compiler_workdir": None,
    "compiler_args": None,
    "inline_weights_to_neff": True,
    "bucket_config": None,
    "max_parallel_compilations": None,
    "spmd_mode": False,
    "checkpoint_loader_callable": None,
    "force_custom_init_on_device": False,
}


def parallel_model_trace(
    func,
    inputs=None,
    tp_degree: int = 1,
    *,
    example_inputs=None,
    threads_per_worker: int | None = None,
    call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S,
    serialization_path: str | os.PathLike | None = None,
    states=None,
    compiler_workdir=None,
    compiler_args=None,
    inline_weights_to_neff: bool = True,
    bucket_config=None,
    max_parallel_compilations: int | None = None,
    spmd_mode: bool = False,
    checkpoint_loader_callable=None,
    force_custom_init_on_device: bool = False,
) -> TensorParallelModel:
    """Start `tp_degree` workers; each builds its shard with `func()` and traces it (torch.export) on `inputs`.

    `func` must be importable by a fresh process (a module-level function, or a
    functools.partial of one). It returns the model, or, as upstream 0.2+ allows,
    `(model, io_aliases)`: `io_aliases` maps some of the model's parameters or
    buffers to the index of an output tensor (in the order the model returns its
    tensors) of the same shape and dtype. After every call that output is copied
    into the tensor, so the next call reads it (state such as a KV cache kept in
    the workers, as Neuron keeps it on the device); the output is still returned,
    and `parallel_model_save` saves the state as it is then. None or {} aliases nothing.

    `inputs` (upstream's name `example_inputs` works too) is a tensor, a tuple of
    tensors (positional arguments) or a dict of tensors (keyword arguments).
    Returns the shards as one TensorParallelModel. `call_timeout_s` bounds each call:
    a call that has not finished by then (or a worker that is stopped, found within
    about a second) closes the model and raises WorkerTimeoutError; None waits without
    limit. With `serialization_path` the traced model is also saved there
    (`parallel_model_save`). The script that calls this needs `if __name__ == "__main__":`.

    Upstream's Neuron-compiler arguments (`states`, `compiler_workdir`,
    `compiler_args`, `inline_weights_to_neff`, `bucket_config`,
    `max_parallel_compilations`, `spmd_mode`, `force_custom_init_on_device`) have
    no meaning without the Neuron compiler: they are accepted and ignored, and one
    log line names those given. Every rank is traced with `func`, as upstream does
    without spmd_mode, so `checkpoint_loader_callable` (which upstream's spmd mode
    uses instead of the weights `func` loads) raises TraceFunctionError with
    `spmd_mode=True`: load the weights in `func`.
    """
    exit_if_spawned_main("parallel_model_trace")
    inputs = _inputs_argument(inputs, example_inputs)
    _check_tp_degree(tp_degree)
    _check_call_timeout(call_timeout_s)
    _check_threads(threads_per_worker)
    _note_neuron_only_arguments(
        states=states, compiler_workdir=compiler_workdir, compiler_args=compiler_args,
        inline_weights_to_neff=inline_weights_to_neff, bucket_config=bucket_config,
        max_parallel_compilations=max_parallel_compilations, spmd_mode=spmd_mode,
        checkpoint_loader_callable=checkpoint_loader_callable, force_custom_init_on_device=force_custom_init_on_device,
    )
    if not callable(func):
        raise TraceFunctionError(f"func must be a function that returns the model, got a {type(func).__name__}.")
    signature, args, kwargs = InputSignature.of_example(inputs)
    try:
        pickle.dumps(func)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TraceFunctionError(
            f"func {func!r} cannot be sent to the worker processes ({error}); define it at module level "
            "(not a lambda or a nested function) so that a fresh process can import it."
        ) from error
    job = TraceJob(func, tuple(a.detach() for a in args), {k: v.detach() for k, v in kwargs.items()})
    threads = threads_per_worker or default_threads_per_worker(tp_degree)
    workers = WorkerGroup(tp_degree, [job] * tp_degree, threads, "parallel_model_trace", call_timeout_s)
    ranks = [RankRecord("", "", 0, collectives, groups) for _, collectives, groups, _ in workers.job_replies]
    outputs, _, _, io_aliases = workers.job_replies[0]
    if any(reply[3] != io_aliases for reply in workers.job_replies):
        workers.kill("the ranks returned different io_aliases")
        raise TraceFunctionError("func returned different io_aliases on different ranks; alias the same state everywhere.")
    model = TensorParallelModel(workers, signature, outputs, ranks, io_aliases)
    if serialization_path is not None:
        try:
            parallel_model_save(model, serialization_path)
        except BaseException:
            model.close()
            raise
    return model


def parallel_model_save(model: TensorParallelModel, save_dir: str | os.PathLike) -> None:
    """Save every shard of `model` under `save_dir/tp_rank_XX/` with a manifest; replaces an earlier save there."""
    if not isinstance(model, TensorParallelModel):
        raise TraceFunctionError(
            f"parallel_model_save takes the TensorParallelModel from parallel_model_trace, got {type(model).__name__}."
        )
    staged = StagedSave(save_dir)
    try:
        replies = model.command("save", str(staged.target), staged.save_id)
        manifest = model.manifest
        ranks = tuple(
            RankRecord(rank_program_file(rank, staged.save_id), sha256, size, record.collectives, record.groups)
            for rank, ((sha256, size), record) in enumerate(zip(replies, manifest.ranks))
        )
        staged.publish(type(manifest)(manifest.tp_degree, manifest.inputs, manifest.outputs, ranks, manifest.io_aliases))
    except BaseException:
        staged.discard()
        raise


def parallel_model_load(
    load_dir: str | os.PathLike,
    *,
    threads_per_worker: int | None = None,
    call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S,
) -> TensorParallelModel:
    """Start one worker per saved shard, load the shards, and return them as one TensorParallelModel.

    Needs neither the model's Python class nor the function that built it. Loading
    runs nothing that the folder holds: the manifest must fit its schema, every file
    must be a regular file of its rank folder with the recorded size and sha256, and
    archives holding pickles, code or native libraries are refused (UnsafeTracedModelError)
    before any worker starts; each worker checks its bytes again before torch reads them,
    and the program's inputs, outputs and collectives against the manifest.
    (Upstream loads TorchScript files, which run their code.) `call_timeout_s` as in
    `parallel_model_trace`. The script that calls this needs `if __name__ == "__main__":`.
    """
    exit_if_spawned_main("parallel_model_load")
    _check_call_timeout(call_timeout_s)
    _check_threads(threads_per_worker)
    load_dir = Path(load_dir).absolute()
    manifest = read_manifest(load_dir)
    jobs = [LoadJob(str(load_dir), record, manifest.inputs, manifest.outputs, manifest.io_aliases)
            for record in manifest.ranks]
    threads = threads_per_worker or default_threads_per_worker(manifest.tp_degree)
    workers = WorkerGroup(manifest.tp_degree, jobs, threads, "parallel_model_load", call_timeout_s)
    return TensorParallelModel(workers, manifest.inputs, manifest.outputs, list(manifest.ranks), manifest.io_aliases)


def _inputs_argument(inputs, example_inputs):
    if inputs is not None and example_inputs is not None:
        raise TraceFunctionError("pass the example inputs once: as inputs or as example_inputs, not both.")
    if inputs is None and example_inputs is None:
        raise TraceFunctionError("parallel_model_trace needs the example inputs (inputs, or upstream's example_inputs).")
    return inputs if inputs is not None else example_inputs


def _check_tp_degree(tp_degree) -> None:
    if not isinstance(tp_degree, int) or isinstance(tp_degree, bool) or tp_degree < 1:
        raise ParallelSizeError(f"tp_degree must be a positive int, got {tp_degree!r}.")


def _check_threads(threads_per_worker) -> None:
    if threads_per_worker is not None and (
        isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) or threads_per_worker < 1
    ):
        raise TraceFunctionError(
            f"threads_per_worker must be a positive int (or None: the cores divided among the workers), "
            f"got {threads_per_worker!r}."
        )


def _check_call_timeout(call_timeout_s) -> None:
    if call_timeout_s is None:
        return
    if isinstance(call_timeout_s, bool) or not isinstance(call_timeout_s, (int, float)) or not call_timeout_s > 0:
        raise TraceFunctionError(f"call_timeout_s must be a positive number of seconds or None, got {call_timeout_s!r}.")


def _is_default(value, default) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _note_neuron_only_arguments(**given) -> None:
    if given["spmd_mode"] and given["checkpoint_loader_callable"] is not None:
        raise TraceFunctionError(
            "spmd_mode=True with checkpoint_loader_callable is not supported here: every rank is traced with func, "
            "so func must return the model with its weights loaded (e.g. with "
            "neuronx_distributed.parallel_layers.load(path, model, sharded=False)). Drop both arguments."
        )
    ignored = [name for name, value in given.items() if not _is_default(value, _NEURON_ONLY_DEFAULTS[name])]
    if ignored:
        logger.warning("parallel_model_trace: ignoring Neuron-compiler argument(s) %s (no Neuron compiler here; "
                       "every rank is traced with torch.export)", ", ".join(ignored))

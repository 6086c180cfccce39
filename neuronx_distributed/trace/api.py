"""The seed's trace API: parallel_model_trace, parallel_model_save, parallel_model_load."""

from __future__ import annotations

import os
import pickle

from ..errors import ParallelSizeError, TraceFunctionError
from .artifact import RankRecord, StagedSave, rank_program_file, read_manifest
from .jobs import LoadJob, TraceJob
from .main_guard import exit_if_spawned_main
from .model import TensorParallelModel
from .signature import InputSignature
from .workers import WorkerGroup, default_threads_per_worker


def parallel_model_trace(func, inputs, tp_degree: int = 1, *, threads_per_worker: int | None = None) -> TensorParallelModel:
    """Start `tp_degree` workers; each builds its shard with `func()` and traces it (torch.export) on `inputs`.

    `func` must be importable by a fresh process (a module-level function, or a
    functools.partial of one); `inputs` is a tensor, a tuple of tensors (positional
    arguments) or a dict of tensors (keyword arguments). Returns the shards as one
    TensorParallelModel. The script that calls this needs `if __name__ == "__main__":`.
    """
    exit_if_spawned_main("parallel_model_trace")
    _check_tp_degree(tp_degree)
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
    workers = WorkerGroup(tp_degree, [job] * tp_degree, threads, "parallel_model_trace")
    ranks = [RankRecord("", "", 0, collectives, groups) for _, collectives, groups in workers.job_replies]
    return TensorParallelModel(workers, signature, workers.job_replies[0][0], ranks)


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
        staged.publish(type(manifest)(manifest.tp_degree, manifest.inputs, manifest.outputs, ranks))
    except BaseException:
        staged.discard()
        raise


def parallel_model_load(load_dir: str | os.PathLike, *, threads_per_worker: int | None = None) -> TensorParallelModel:
    """Start one worker per saved shard, load the shards, and return them as one TensorParallelModel.

    Needs neither the model's Python class nor the function that built it.
    The script that calls this needs `if __name__ == "__main__":`.
    """
    exit_if_spawned_main("parallel_model_load")
    manifest = read_manifest(load_dir)
    jobs = [
        LoadJob(os.path.join(os.path.abspath(load_dir), record.file), manifest.outputs, record.groups)
        for record in manifest.ranks
    ]
    threads = threads_per_worker or default_threads_per_worker(manifest.tp_degree)
    workers = WorkerGroup(manifest.tp_degree, jobs, threads, "parallel_model_load")
    return TensorParallelModel(workers, manifest.inputs, manifest.outputs, list(manifest.ranks))


def _check_tp_degree(tp_degree) -> None:
    if not isinstance(tp_degree, int) or isinstance(tp_degree, bool) or tp_degree < 1:
        raise ParallelSizeError(f"tp_degree must be a positive int, got {tp_degree!r}.")

"""The cross-rank steps of a checkpoint save or load: where this rank sits, and agreeing on each step's outcome.

Every rank enters each step (`agree`) with its error, if any, and a value; every
rank leaves it with all ranks' values, or with the same typed error. A failure is
first made one of `neuronx_distributed.errors` (`as_save_error`, `as_read_error`),
so that the ranks that did not fail raise that type too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .. import errors
from ..errors import CheckpointError, CheckpointSaveError, NeuronxDistributedError
from . import parallel_state


@dataclass(frozen=True)
class Placement:
    """This rank's TP degree, TP rank, DP rank and TP group (None outside initialize_model_parallel)."""

    tp_size: int
    tp_rank: int
    dp_rank: int
    tp_group: object

    @property
    def distributed(self) -> bool:
        return dist.is_initialized() and dist.get_world_size() > 1


def current_placement() -> Placement:
    """This rank's placement under `parallel_state` (TP degree 1, DP rank = global rank, before it is initialized)."""
    if parallel_state.model_parallel_is_initialized():
        return Placement(
            parallel_state.get_tensor_model_parallel_size(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_tensor_model_parallel_group(),
        )
    return Placement(1, 0, dist.get_rank() if dist.is_initialized() else 0, None)


def agree(placement: Placement, error: BaseException | None, what: str, value=None) -> list:
    """Every rank's `value`, once all ranks got here; raise on every rank if any failed.

    A failing rank raises its own error; the others raise the same type (a class of
    `neuronx_distributed.errors`, else CheckpointError) naming the failed rank.
    Decisions that shape later collectives are taken from the returned list, the
    same on every rank.
    """
    if placement.distributed:
        reports = [None] * dist.get_world_size()
        failure = None if error is None else (type(error).__name__, str(error))
        dist.all_gather_object(reports, (failure, value))
    else:
        reports = [(None, value)]
    if error is not None:
        raise error
    failed = [(rank, failure) for rank, (failure, _) in enumerate(reports) if failure]
    if failed:
        rank, (type_name, message) = failed[0]
        error_type = getattr(errors, type_name, None)
        if not (isinstance(error_type, type) and issubclass(error_type, NeuronxDistributedError)):
            error_type = CheckpointError
        raise error_type(f"{what} failed on rank {rank} ({len(failed)} rank(s) failed): {type_name}: {message}")
    return [reported for _, reported in reports]


def as_read_error(error: Exception, path: str) -> Exception:
    """`error` as a typed error: ours unchanged, anything else (an OSError, a reader's own error) as CheckpointError."""
    if isinstance(error, NeuronxDistributedError):
        return error
    wrapped = CheckpointError(f"reading the checkpoint at {path!r} failed ({type(error).__name__}: {error}); check the path and its permissions.")
    wrapped.__cause__ = error
    return wrapped


def as_save_error(error: Exception, save_dir: str) -> Exception:
    """`error` as a typed error: ours unchanged, an OSError (disk full, permissions) as CheckpointSaveError."""
    if isinstance(error, NeuronxDistributedError):
        return error
    wrapped = CheckpointSaveError(
        f"writing the checkpoint at {save_dir!r} failed ({type(error).__name__}: {error}); check the path, its "
        "permissions and the free space. The previous checkpoint there (if any) is kept."
    )
    wrapped.__cause__ = error
    return wrapped

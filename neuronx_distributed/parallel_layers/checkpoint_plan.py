"""The plan of a save: which TP rank writes which tensor into which shard file, the same on every rank.

Each writing rank (DP rank 0 of its TP rank) reports what it holds (`RankReport`:
each tensor's local shape, dtype and layout, and a crc32 (`fingerprint`) of every
tensor it would save unsharded); `build_plan` turns the reports of all TP ranks
into the manifest's tensor entries and each file's tensors. It is a pure function
of the reports, so every rank that has them builds the same plan; nothing is
written before it is agreed.

- sharded: every rank writes its shard; the entry has the global shape.
- replicated, bytewise the same on every TP rank: written once, into the file of TP
  rank 0 (the lowest rank that holds it), recorded as the entry's `file` (an entry
  without one is in every file, as in format version 1).
- replicated with a different value per rank, a tensor outside the model (a
  per-rank counter, say): every rank writes its own, read back by the rank of
  the same index.
- a shape or dtype that differs between ranks: `local` (each rank's own value).
- a model tensor saved as replicated whose copies differ: ReplicatedMismatchError,
  raised before anything is written (a shard that lost its layout, or ranks built
  with different seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from zlib_ng.zlib_ng import crc32

from ..errors import CheckpointSaveError, ReplicatedMismatchError
from . import checkpoint_format as fmt


def fingerprint(tensor: torch.Tensor) -> str:
    """crc32 of a CPU tensor's bytes in row-major order, as 8 hex digits."""
    return f"{crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()):08x}"


@dataclass
class RankReport:
    """What one TP rank would save: local entries, crc32 fingerprints of its unsharded tensors, its model tensors."""

    tp_rank: int
    entries: dict[str, fmt.TensorEntry]
    fingerprints: dict[str, str]
    model_names: frozenset[str] = frozenset()
    model_key: str | None = None


@dataclass
class SavePlan:
    """The manifest's tensor entries and, for each TP rank, the tensors its shard file holds (in order)."""

    tensors: dict[str, fmt.TensorEntry]
    files: list[list[str]] = field(default_factory=list)
    model_key: str | None = None

    def written_once(self) -> list[str]:
        """The tensors stored in one file only."""
        return [name for name, entry in self.tensors.items() if entry.file is not None]


def _replicated_mismatch(name: str, per_rank: list, fingerprints: list[dict]) -> ReplicatedMismatchError:
    differs = next(rank for rank, entry in enumerate(per_rank) if entry != per_rank[0] or
                   fingerprints[rank].get(name) != fingerprints[0].get(name))
    what = f"{per_rank[0].shape} on TP rank 0 and {per_rank[differs].shape}" if per_rank[differs] != per_rank[0] else \
        "a different value on TP rank 0 than"
    return ReplicatedMismatchError(
        f"model tensor '{name}' carries no tensor-parallel attributes, so it would be saved as replicated, but it has "
        f"{what} on TP rank {differs}. Either it is a shard whose attributes were lost, which happens when the state "
        "dict is copied or cast ({k: v.clone() ...}, .to(dtype), .bfloat16()): save model.state_dict() itself (cast "
        "the model, not its state dict) or pass the model (save(..., model=model)); or the TP ranks' copies of a "
        "replicated weight differ, which happens when the ranks built the model without the same seed: seed every "
        "rank alike before building it. Saved as is, merging or resharding this checkpoint would give wrong tensors."
    )


def _sharded_entry(name: str, per_rank: list, world: int) -> fmt.TensorEntry:
    first = per_rank[0]
    for rank, entry in enumerate(per_rank):
        if entry != first:
            raise CheckpointSaveError(
                f"'{name}' is a shard {first} on TP rank 0 but {entry} on TP rank {rank}; every TP rank must "
                "save the same state dict structure (model.state_dict() of the same model)."
            )
    shape = list(first.shape)
    shape[first.partition_dim] *= world
    return fmt.TensorEntry(shape, first.dtype, fmt.SHARDED, first.partition_dim, first.partition_stride, first.parts)


def build_plan(reports: list[RankReport]) -> SavePlan:
    """The plan for the TP ranks' `reports` (index = TP rank); see the module docstring."""
    world = len(reports)
    fingerprints = [report.fingerprints for report in reports]
    model_names = frozenset().union(*(report.model_names for report in reports))
    tensors: dict[str, fmt.TensorEntry] = {}
    for name in dict.fromkeys(name for report in reports for name in report.entries):
        per_rank = [report.entries.get(name) for report in reports]
        first = next(entry for entry in per_rank if entry is not None)
        if first.layout == fmt.SHARDED:
            tensors[name] = _sharded_entry(name, per_rank, world)
            continue
        differs = any(entry != first for entry in per_rank)
        prints = [ranks.get(name) for ranks in fingerprints]
        same_value = None not in prints and len(set(prints)) == 1
        if name in model_names and world > 1 and (differs or not same_value):
            raise _replicated_mismatch(name, per_rank, fingerprints)
        if differs:
            tensors[name] = fmt.TensorEntry(list(first.shape), first.dtype, fmt.LOCAL)
        elif first.layout == fmt.REPLICATED and world > 1 and same_value:
            tensors[name] = fmt.TensorEntry(list(first.shape), first.dtype, fmt.REPLICATED, file=0)
        else:
            tensors[name] = first
    files = [[name for name in report.entries if fmt.file_holding(tensors[name], rank) == rank]
             for rank, report in enumerate(reports)]
    return SavePlan(tensors, files, reports[0].model_key)

"""The save plans of a tag's sharded folders, agreed by every rank before any file is written.

A tag of `save_checkpoint` holds up to three kinds of sharded folders, each in the
format of `parallel_layers.save`:

- the model, written by DP rank 0 of each TP rank with the plan `parallel_layers.save`
  follows (`checkpointing.plan_save`: layouts from what the model's layers declare,
  replicated tensors written once, by TP rank 0);
- a plain optimizer's state, written by the same ranks;
- ZeRO-1's partitions, `optim/dp_rank_XX`, each written by the TP ranks of DP rank XX.

Optimizer state records no layouts, so each of its tensors is planned as replicated
(`checkpoint_plan.build_plan`): one that is bytewise the same on every TP rank (the
moments of a replicated parameter, a step counter) is written once, by TP rank 0; the
others are written by each TP rank for itself and load back at the saved TP degree.

Planning is collective and runs where the save is called; writing a planned folder
(`FolderWrite`) is not, so a background thread can do it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsafeCheckpointError
from ..parallel_layers import checkpoint_format as fmt
from ..parallel_layers import checkpointing
from ..parallel_layers.checkpoint_agreement import agree
from ..parallel_layers.checkpoint_plan import RankReport, SavePlan, build_plan, fingerprint
from ..parallel_layers.state_tree import flatten


@dataclass
class FolderWrite:
    """This rank's part of a planned folder: the tensors its plan gives this rank (CPU, contiguous) and the
    state structure (which also names the tensors that other ranks' files hold)."""

    tensors: dict[str, torch.Tensor]
    structure: object

    def write(self, folder: str, tp_rank: int, save_id: str) -> fmt.FileEntry:
        """Write this rank's shard file into `folder`; return its manifest entry. No collectives."""
        return fmt.write_shard_file(folder, tp_rank, save_id, self.tensors, self.structure)


def _part(state, plan: SavePlan, tp_rank: int) -> FolderWrite:
    flat = flatten(state)
    return FolderWrite({name: flat.tensors[name] for name in plan.files[tp_rank]}, flat.structure)


def _replicated_report(state, tp_rank: int, tp_size: int) -> RankReport:
    """Every tensor of `state` (CPU, contiguous) as replicated, with a crc32 of its bytes when TP > 1."""
    entries, fingerprints = {}, {}
    for name, tensor in flatten(state).tensors.items():
        dtype = fmt.dtype_name(tensor.dtype)
        if dtype not in fmt.SAFETENSORS_DTYPES or tensor.layout != torch.strided:
            raise UnsafeCheckpointError(
                f"cannot save optimizer tensor '{name}': a {tensor.layout} tensor of dtype {tensor.dtype}, which "
                f"safetensors cannot hold (dense tensors of {sorted(fmt.SAFETENSORS_DTYPES)})."
            )
        entries[name] = fmt.TensorEntry(list(tensor.shape), dtype, fmt.REPLICATED)
        if tp_size > 1:
            fingerprints[name] = fingerprint(tensor)
    return RankReport(tp_rank, entries, fingerprints)


def agree_plans(writes: dict, model_folder: str, has_model: bool, model: nn.Module | None,
                placement) -> tuple[dict[str, SavePlan], dict[str, FolderWrite]]:
    """(folder -> its plan, the same on every rank; folder -> this rank's `FolderWrite`) for a tag's folders.

    `writes`: folder -> the snapshot state this rank writes there (the model's under
    `model_folder`, on DP rank 0 only). Every rank calls it, with `has_model` the same
    everywhere; `model` (or None: the tensors' attributes) gives the model's layouts. A
    state that cannot be saved raises the same typed error on every rank, before any
    file is written.
    """
    plans, parts = {}, {}
    if has_model:
        state = writes.get(model_folder)
        plans[model_folder] = checkpointing.plan_save(state, model_key=None, model=model)
        if state is not None:
            parts[model_folder] = _part(state, plans[model_folder], placement.tp_rank)
    error, reports = None, {}
    try:
        for folder, state in writes.items():
            if folder != model_folder:
                reports[folder] = _replicated_report(state, placement.tp_rank, placement.tp_size)
    except Exception as caught:  # reported to every rank
        error = caught
    by_folder: dict[str, list[RankReport]] = {}
    for rank_reports in agree(placement, error, "planning the optimizer state", reports):
        for folder, report in rank_reports.items():
            by_folder.setdefault(folder, []).append(report)
    for folder, folder_reports in by_folder.items():
        plans[folder] = build_plan(sorted(folder_reports, key=lambda report: report.tp_rank))
        if folder in writes:
            parts[folder] = _part(writes[folder], plans[folder], placement.tp_rank)
    return plans, parts

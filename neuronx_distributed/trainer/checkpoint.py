"""Tagged training checkpoints: `save_checkpoint`, `load_checkpoint`, `has_checkpoint`, `finalize_checkpoint`.

Layout of `checkpoint_dir` (upstream NxD's names, our file format):

    newest                    JSON: the newest tag and the kept tags, oldest first
    <tag>/checkpoint.json     what the tag holds (model, optimizer kind, scheduler, user content) and its TP x DP
    <tag>/model/              the model, a sharded checkpoint of `parallel_layers.save`'s format and plan
    <tag>/optim/              a plain optimizer's state per TP rank, same format (written by DP rank 0)
    <tag>/optim/dp_rank_XX/   ZeRO-1: each DP rank's partition, same format
    <tag>/scheduler.json      the learning-rate scheduler's state_dict
    <tag>/user_content.json   `user_content`

Before anything is written, the ranks agree on each folder's plan (`tag_plans`):
the model's is the one `parallel_layers.save` follows, so a tensor replicated
across TP ranks (a bias, a norm) is written once, by TP rank 0, as is optimizer
state that is the same on every TP rank. A save writes everything into
`.saving-<tag>-<id>/` first. Once every rank has written its files, global rank
0 writes the manifests, renames the folder to `<tag>` and then replaces
`newest` (write aside, fsync, rename), which is what makes the tag the one
`load_checkpoint(tag=None)` and `has_checkpoint` find; only then are the tags
beyond `num_kept_ckpts` removed. A save that fails on any rank raises on every
rank and leaves the previous tags as they were; one that is killed leaves only
its `.saving-*` folder, which nothing reads (the next save by rank 0 removes it).

`async_save=True`: the state is copied to CPU memory and the plans are agreed at
the call (training may change the state right after), and a background thread
writes the copy; the commit above happens in the next `save_checkpoint`,
`load_checkpoint` or `finalize_checkpoint` (collectives of this thread only, so
the background thread never races training's collectives), which also raise
that save's error on every rank. A process that exits without
`finalize_checkpoint` leaves its last async save invisible, never partial.

No pickle: tensors in safetensors, scheduler state and user content as JSON
(anything JSON cannot hold raises UnsafeCheckpointError, naming where it is).
Model tensors reshard on load like `parallel_layers.load`; optimizer state loads
at the TP degree it was saved at, and ZeRO-1 state at any DP degree (each rank then
reads every saved partition of its TP rank and cuts its own chunks from them). One job saves to
a folder at a time (no lock across jobs, unlike `parallel_layers.save`).
Unlike upstream, `num_workers` and `use_xser` (Neuron/XLA serialization
settings) change nothing here, and loading checks the whole checkpoint against
the model and optimizer before anything changes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..durable import fsync_path, replace_with_text
from ..errors import (
    CheckpointArgumentError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    OptimizerStateError,
    ReshardError,
    UnsafeCheckpointError,
)
from ..optimizer import NeuronZero1Optimizer
from ..parallel_layers import checkpoint_format as fmt
from ..parallel_layers import checkpointing, parallel_state
from ..parallel_layers.checkpoint_agreement import agree, as_read_error, as_save_error, current_placement
from ..parallel_layers.checkpoint_plan import SavePlan
from ..parallel_layers.state_tree import decode, flatten
from ..parallel_layers.utils import copy_tensor_model_parallel_attributes
from .optimizer import NxDOptimizer
from .tag_plans import FolderWrite, agree_plans

FORMAT = "neuronx_distributed.trainer_checkpoint/1"
RECORD = "newest"
MARKER = "checkpoint.json"
MODEL_FOLDER, OPTIM_FOLDER = "model", "optim"
SCHEDULER_FILE, USER_CONTENT_FILE = "scheduler.json", "user_content.json"
STAGING_PREFIX = ".saving-"
PLAIN, ZERO1 = "plain", "zero1"


@dataclass
class _Save:
    """A save whose files this rank writes (on a background thread when async) and that is committed later."""

    checkpoint_dir: str
    tag: str
    save_id: str
    num_kept: int | None
    marker: dict
    writes: dict[str, FolderWrite]  # folder inside the tag -> what this rank writes there
    texts: dict  # file inside the tag -> JSON text (global rank 0 only)
    plans: dict[str, SavePlan] = field(default_factory=dict)  # every folder of the tag, the same on every rank
    reports: dict = field(default_factory=dict)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    @property
    def staging(self) -> str:
        return os.path.join(self.checkpoint_dir, f"{STAGING_PREFIX}{self.tag}-{self.save_id}")

    def write(self, placement) -> None:
        try:
            for relative, text in self.texts.items():
                path = os.path.join(self.staging, relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                replace_with_text(path, text, path + ".tmp")
            for folder, part in self.writes.items():
                self.reports[folder] = part.write(os.path.join(self.staging, folder), placement.tp_rank, self.save_id)
        except BaseException as error:  # noqa: BLE001 - reported to every rank at the commit
            self.error = as_save_error(error, self.checkpoint_dir) if isinstance(error, Exception) else error
        finally:
            self.writes = {}  # the snapshot's memory goes once written


_pending: _Save | None = None


def _world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_gather(value) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _broadcast(value):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ---------------------------------------------------------------- save


def save_checkpoint(
    checkpoint_dir_str: str,
    tag,
    model=None,
    optimizer=None,
    scheduler=None,
    user_content=None,
    num_workers: int = 8,
    use_xser: bool = False,
    num_kept_ckpts: int | None = None,
    async_save: bool = False,
    zero1_optimizer: bool = False,
) -> None:
    """Save the model, optimizer, scheduler and user content as tag `tag` of `checkpoint_dir_str` (every rank calls it).

    `model`: a module (or its state dict); `optimizer`: an NxDOptimizer, a
    NeuronZero1Optimizer or a torch optimizer (or a state dict, ZeRO-1's when
    `zero1_optimizer`); `scheduler`: anything with `state_dict()`; `user_content`:
    JSON-representable values (dicts, lists, tuples, str, numbers, bool, None).
    `num_kept_ckpts`: keep only that many newest tags (None or -1: all). The tag
    must be new in the folder. See the module docstring for atomicity and async.
    """
    global _pending
    finalize_checkpoint()
    placement = current_placement()
    error, save = None, None
    try:
        checkpoint_dir = os.fspath(checkpoint_dir_str)
        tag = _checked_tag(tag)
        _check_num_kept(num_kept_ckpts)
        for name, value in (("async_save", async_save), ("zero1_optimizer", zero1_optimizer), ("use_xser", use_xser)):
            if not isinstance(value, bool):
                raise CheckpointArgumentError(f"{name} must be True or False, got {value!r}.")
        optimizer_kind = _optimizer_kind(optimizer, zero1_optimizer)
        marker = {
            "format": FORMAT, "tag": tag, "model": model is not None, "optimizer": optimizer_kind,
            "scheduler": scheduler is not None, "user_content": user_content is not None,
            "tensor_parallel_size": placement.tp_size, "data_parallel_size": _data_parallel_size(),
        }
        snapshots, texts = _rank_writes(model, optimizer, optimizer_kind, placement)
        if _world_rank() == 0:
            if scheduler is not None:
                texts[SCHEDULER_FILE] = _json_text(_state_dict_of(scheduler, "scheduler"), "the scheduler's state_dict")
            if user_content is not None:
                texts[USER_CONTENT_FILE] = _json_text(user_content, "user_content")
            texts[MARKER] = json.dumps(marker, indent=1)
            _check_new_tag(checkpoint_dir, tag)
        save = _Save(checkpoint_dir, tag, "", num_kept_ckpts, marker, {}, texts)
    except Exception as caught:  # every rank learns about it below
        error = as_save_error(caught, str(checkpoint_dir_str))
    agree(placement, error, f"saving checkpoint tag {tag!r}")
    save.plans, save.writes = agree_plans(snapshots, MODEL_FOLDER, model is not None,
                                          model if isinstance(model, nn.Module) else None, placement)
    del snapshots  # what this rank does not write goes now
    save.save_id = _broadcast(uuid.uuid4().hex if _world_rank() == 0 else None)
    if async_save:
        save.thread = threading.Thread(target=save.write, args=(placement,), name="nxd-checkpoint-save", daemon=True)
        save.thread.start()
        _pending = save
    else:
        save.write(placement)
        _commit(save, placement)


def finalize_checkpoint() -> None:
    """Wait for the pending async save, make it visible, and raise its error (on every rank) if it failed."""
    global _pending
    save, _pending = _pending, None
    if save is not None:
        save.thread.join()
        _commit(save, current_placement())


def _commit(save: _Save, placement) -> None:
    """Every rank reports its writes; global rank 0 writes the manifests and makes the tag visible (or discards it)."""
    local = None if save.error is None else f"{type(save.error).__name__}: {save.error}"
    reports = _all_gather((local, placement.tp_rank, save.reports))
    failure = None
    if _world_rank() == 0:
        failure = _publish(save, reports)
    failure = _broadcast(failure)
    if save.error is not None:
        raise save.error
    if failure is not None:
        raise CheckpointSaveError(failure)


def _publish(save: _Save, reports: list) -> str | None:
    """Rank 0's part of the commit; returns why the save failed, or None once the tag is the newest."""
    failed = [f"rank {rank}: {error}" for rank, (error, _, _) in enumerate(reports) if error]
    try:
        if failed:
            raise CheckpointSaveError(
                f"saving tag {save.tag!r} in {save.checkpoint_dir!r} failed, so the previous tags are kept: {'; '.join(failed)}"
            )
        tp_size = save.marker["tensor_parallel_size"]
        files = {folder: [None] * tp_size for folder in save.plans}
        for _, tp_rank, written in reports:
            for folder, file_entry in written.items():
                files[folder][tp_rank] = file_entry
        for folder, plan in save.plans.items():  # every TP rank wrote its file of each folder: none failed
            manifest = fmt.Manifest(tp_size, save.save_id, plan.model_key, files[folder], plan.tensors)
            fmt.write_manifest(os.path.join(save.staging, folder), manifest)
        final = os.path.join(save.checkpoint_dir, save.tag)
        os.rename(save.staging, final)
        fsync_path(save.checkpoint_dir)
        kept = [*[t for t in _recorded_tags(save.checkpoint_dir) if t != save.tag], save.tag]
        dropped = kept[: -save.num_kept] if save.num_kept not in (None, -1) else []
        kept = kept[len(dropped):]
        record = json.dumps({"format": FORMAT, "newest": save.tag, "tags": kept}, indent=1)
        path = os.path.join(save.checkpoint_dir, RECORD)
        replace_with_text(path, record, f"{path}.{save.save_id}.tmp")
    except Exception as error:  # noqa: BLE001 - returned to every rank
        shutil.rmtree(save.staging, ignore_errors=True)
        return str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"
    for tag in dropped:
        shutil.rmtree(os.path.join(save.checkpoint_dir, tag), ignore_errors=True)
    for name in os.listdir(save.checkpoint_dir):  # what killed saves left behind
        if name.startswith(STAGING_PREFIX):
            shutil.rmtree(os.path.join(save.checkpoint_dir, name), ignore_errors=True)
    return None


def _rank_writes(model, optimizer, optimizer_kind, placement) -> tuple[dict, dict]:
    """The snapshots this rank writes: the model and a plain optimizer on DP rank 0, ZeRO-1 partitions on every rank."""
    writes: dict = {}
    dp_rank = placement.dp_rank
    if model is not None and dp_rank == 0:
        state = model if isinstance(model, dict) else _state_dict_of(model, "model")
        writes[MODEL_FOLDER] = _snapshot(state)
    if optimizer_kind == ZERO1:
        writes[f"{OPTIM_FOLDER}/dp_rank_{dp_rank:02d}"] = {"optimizer": _snapshot(_state_dict_of(optimizer, "optimizer"))}
    elif optimizer_kind == PLAIN and dp_rank == 0:
        writes[OPTIM_FOLDER] = {"optimizer": _snapshot(_state_dict_of(optimizer, "optimizer"))}
    return writes, {}


def _snapshot(tree, memo: dict | None = None):
    """A CPU copy of every tensor in `tree` (same structure, TP attributes and ties kept), contiguous and
    each in memory of its own as shard files want it."""
    memo = {} if memo is None else memo
    if isinstance(tree, torch.Tensor):
        if id(tree) not in memo:
            dense = tree.layout == torch.strided  # a sparse one is copied as is, and refused by the plan
            copy = tree.detach().to("cpu", copy=True, memory_format=torch.contiguous_format if dense else torch.preserve_format)
            copy_tensor_model_parallel_attributes(copy, tree)
            memo[id(tree)] = copy
        return memo[id(tree)]
    if isinstance(tree, dict):
        return {key: _snapshot(value, memo) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_snapshot(value, memo) for value in tree)
    return tree


def _state_dict_of(obj, what: str):
    state_dict = getattr(obj, "state_dict", None)
    if not callable(state_dict):
        raise CheckpointArgumentError(f"{what} must have a state_dict() method (or be a state dict), got {type(obj).__name__}.")
    return state_dict()


def _json_text(value, what: str) -> str:
    """`value` as JSON text (tuples, non-string keys and non-finite floats tagged); tensors and other objects refused."""
    flat = flatten(value)
    if flat.tensors:
        where = ", ".join(".".join(map(str, path)) or "(the value itself)" for path in flat.paths.values())
        raise UnsafeCheckpointError(
            f"{what} holds tensors ({where}), which are saved as JSON here; convert them (tensor.tolist()) or keep "
            "them in the model or optimizer."
        )
    return json.dumps(flat.structure, allow_nan=False)


def _optimizer_kind(optimizer, zero1_optimizer: bool) -> str | None:
    if optimizer is None:
        return None
    if isinstance(optimizer, dict):
        return ZERO1 if zero1_optimizer else PLAIN
    inner = optimizer.optimizer if isinstance(optimizer, NxDOptimizer) else optimizer
    if isinstance(inner, NeuronZero1Optimizer):
        return ZERO1
    if isinstance(inner, torch.optim.Optimizer):
        return PLAIN
    raise CheckpointArgumentError(
        f"optimizer must be an NxDOptimizer, a NeuronZero1Optimizer, a torch.optim.Optimizer or a state dict, got "
        f"{type(optimizer).__name__}."
    )


def _data_parallel_size() -> int:
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_size()
    return dist.get_world_size() if dist.is_initialized() else 1


def _checked_tag(tag) -> str:
    if isinstance(tag, bool) or not isinstance(tag, (str, int)):
        raise CheckpointArgumentError(f"tag must be a string or an int, got {type(tag).__name__}.")
    tag = str(tag)
    if not tag or tag in (".", "..", RECORD) or tag.startswith(".") or os.sep in tag or (os.altsep and os.altsep in tag):
        raise CheckpointArgumentError(
            f"tag {tag!r} cannot name a checkpoint folder; use a plain name such as 'step_100' (no path separators, "
            f"not starting with '.', not {RECORD!r})."
        )
    return tag


def _check_num_kept(num_kept) -> None:
    if num_kept is None or num_kept == -1:
        return
    if isinstance(num_kept, bool) or not isinstance(num_kept, int) or num_kept < 1:
        raise CheckpointArgumentError(f"num_kept_ckpts must be a positive int, -1 or None (keep all), got {num_kept!r}.")


def _check_new_tag(checkpoint_dir: str, tag: str) -> None:
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise CheckpointArgumentError(f"checkpoint_dir {checkpoint_dir!r} is a file; pass a folder (it is created if missing).")
    os.makedirs(checkpoint_dir, exist_ok=True)
    if os.path.lexists(os.path.join(checkpoint_dir, tag)):
        raise CheckpointArgumentError(
            f"{os.path.join(checkpoint_dir, tag)!r} already exists; save under a new tag (e.g. the step number), or "
            "delete that folder first."
        )


# ---------------------------------------------------------------- load


def _read_record(checkpoint_dir: str) -> dict | None:
    path = os.path.join(checkpoint_dir, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            record = json.load(file)
        if record.get("format") != FORMAT or not isinstance(record.get("tags"), list) or record.get("newest") not in record["tags"]:
            raise ValueError("unexpected content")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointCorruptError(
            f"{path} is not a checkpoint record of save_checkpoint ({error}); restore it or pass tag= explicitly."
        ) from None
    return record


def _recorded_tags(checkpoint_dir: str) -> list[str]:
    record = _read_record(checkpoint_dir)
    return list(record["tags"]) if record else []


def has_checkpoint(checkpoint_dir_str: str) -> bool:
    """True when `checkpoint_dir_str` holds a completed save of `save_checkpoint` (its newest tag is there)."""
    checkpoint_dir = os.fspath(checkpoint_dir_str)
    try:
        record = _read_record(checkpoint_dir)
    except CheckpointCorruptError:
        return False
    return record is not None and os.path.isfile(os.path.join(checkpoint_dir, record["newest"], MARKER))


def _read_json(path: str, what: str):
    try:
        with open(path) as file:
            return decode(json.load(file), _no_tensors)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} ({what}) is missing; copy the whole tag folder.") from None
    except (OSError, ValueError) as error:
        raise CheckpointCorruptError(f"{path} ({what}) cannot be read: {error}") from None


def _no_tensors(name: str):
    raise CheckpointCorruptError(f"a JSON file of the checkpoint references tensor {name!r}; it is damaged.")


def load_checkpoint(
    path: str,
    tag=None,
    model=None,
    optimizer=None,
    scheduler=None,
    num_workers: int = 8,
    strict: bool = True,
):
    """Load tag `tag` (None: the newest) of `path` into the given objects; return its user content (or None).

    Every rank calls it. The tag's contents are checked against the model
    (`parallel_layers.load`'s checks: keys, shapes, sharding, checksums) and the
    optimizer (its kind, groups and state shapes) before anything changes; on a
    mismatch every rank raises a typed error and nothing is loaded.
    """
    finalize_checkpoint()
    placement = current_placement()
    error, tag_dir, marker, scheduler_state, user_content = None, None, None, None, None
    try:
        checkpoint_dir = os.fspath(path)
        if tag is None:
            record = _read_record(checkpoint_dir)
            if record is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint record ({RECORD!r}) in {checkpoint_dir!r}: nothing was saved there with "
                    "save_checkpoint, or no save finished; check has_checkpoint() first, or pass tag=."
                )
            tag = record["newest"]
        tag_dir = os.path.join(checkpoint_dir, _checked_tag(tag))
        marker = _read_json(os.path.join(tag_dir, MARKER), "the tag's description")
        if not isinstance(marker, dict) or marker.get("format") != FORMAT:
            raise CheckpointCorruptError(f"{tag_dir} is not a tag folder of save_checkpoint.")
        for name, wanted in (("model", model), ("scheduler", scheduler)):
            if wanted is not None and not marker.get(name):
                raise CheckpointKeyError(f"tag {tag!r} holds no {name} state; pass {name}=None.")
        if optimizer is not None:
            _check_optimizer_kind(optimizer, marker, tag)
        if model is not None and not isinstance(model, nn.Module):
            raise CheckpointArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if scheduler is not None:
            scheduler_state = _read_json(os.path.join(tag_dir, SCHEDULER_FILE), "the scheduler state")
        if marker.get("user_content"):
            user_content = _read_json(os.path.join(tag_dir, USER_CONTENT_FILE), "the user content")
    except Exception as caught:  # every rank learns about it below
        error = as_read_error(caught, str(path))
    agree(placement, error, f"loading checkpoint tag {tag!r}")
    optimizer_state = None
    if optimizer is not None:
        saved = [checkpointing.load(os.path.join(tag_dir, folder), model_key=None).get("optimizer")
                 for folder in _optimizer_folders(marker, placement.dp_rank)]
        error = None
        try:
            optimizer_state = saved[0] if len(saved) == 1 else _resharded_zero1_state(optimizer, saved, tag)
            _check_optimizer_state(optimizer, optimizer_state, tag)
        except Exception as caught:  # every rank learns about it below
            error = as_read_error(caught, str(path))
        agree(placement, error, f"checking the optimizer state of tag {tag!r}")
    if model is not None:
        checkpointing.load(os.path.join(tag_dir, MODEL_FOLDER), model, model_key=None, strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    return user_content


def _optimizer_folders(marker: dict, dp_rank: int) -> list[str]:
    """The optimizer folders of the tag this rank reads: a plain optimizer's, its own ZeRO-1 partition
    when the DP size is the saved one, else every saved partition (to cut this rank's chunks from)."""
    if marker["optimizer"] != ZERO1:
        return [OPTIM_FOLDER]
    saved_size = marker["data_parallel_size"]
    ranks = [dp_rank] if saved_size == _data_parallel_size() else range(saved_size)
    return [os.path.join(OPTIM_FOLDER, f"dp_rank_{rank:02d}") for rank in ranks]


def _resharded_zero1_state(optimizer, saved: list, tag: str) -> dict:
    """A `NeuronZero1Optimizer.state_dict()` for this rank, cut from the partitions saved at another DP size.

    Saved DP rank r of D held elements [r*c, r*c + c) of each flattened parameter (c = ceil(numel / D),
    zero padding past the end); this rank takes its own chunk of the current DP size from them.
    Element-wise state and master chunks are cut; step counters and other values come from DP rank 0.
    """
    inner = optimizer.optimizer if isinstance(optimizer, NxDOptimizer) else optimizer
    damaged = OptimizerStateError(
        f"the ZeRO-1 optimizer state of tag {tag!r} does not fit this optimizer: it was saved for another model, "
        "optimizer or optimizer_dtype; load it into the model and optimizer it was saved with."
    )
    live = inner.state_dict()
    numels = [p.numel() for group in inner.param_groups for p in group["params"]]
    saved_chunks = [math.ceil(n / len(saved)) for n in numels]
    group_sizes = [len(chunks) for chunks in live["sharding"]["chunks"]]
    for rank, state in enumerate(saved):
        layout = state.get("sharding") if isinstance(state, dict) else None
        if not isinstance(layout, dict) or state.get("format") != live["format"]:
            raise damaged
        saved_groups = layout.get("chunks")
        if (layout.get("rank") != rank or layout.get("size") != len(saved)
                or layout.get("optimizer_dtype") != live["sharding"]["optimizer_dtype"]
                or not isinstance(saved_groups, list) or not all(isinstance(g, list) for g in saved_groups)
                or [len(g) for g in saved_groups] != group_sizes or sum(saved_groups, []) != saved_chunks):
            raise damaged
    chunks = sum(live["sharding"]["chunks"], [])
    rank = live["sharding"]["rank"]

    def cut(index: int, pieces: list[torch.Tensor]) -> torch.Tensor:
        """This rank's chunk of parameter `index`, from the saved chunks `pieces` (one per saved DP rank)."""
        if any(not isinstance(piece, torch.Tensor) or piece.shape != (saved_chunks[index],) for piece in pieces):
            raise damaged
        flat = torch.cat(pieces)[: numels[index]]
        mine = flat[rank * chunks[index] : (rank + 1) * chunks[index]]
        return torch.nn.functional.pad(mine, (0, chunks[index] - mine.numel()))

    first = saved[0]
    if not isinstance(first.get("state"), dict) or any(
        not isinstance(state.get("state"), dict) or state["state"].keys() != first["state"].keys()
        or not isinstance(state.get("master_weights"), list) or len(state["master_weights"]) != len(numels)
        for state in saved
    ):
        raise damaged
    per_param = {}
    for index, values in first["state"].items():
        if (not isinstance(index, int) or not 0 <= index < len(numels)
                or any(not isinstance(state["state"][index], dict) for state in saved)):
            raise damaged
        per_param[index] = {
            key: cut(index, [state["state"][index].get(key) for state in saved])
            if isinstance(value, torch.Tensor) and value.dim() > 0 else value
            for key, value in values.items()
        }
    masters = [cut(index, [state["master_weights"][index] for state in saved]) for index in range(len(numels))]
    return {**live, "state": per_param, "param_groups": first.get("param_groups"), "master_weights": masters}


def _check_optimizer_kind(optimizer, marker: dict, tag: str) -> None:
    saved, given = marker.get("optimizer"), _optimizer_kind(optimizer, False)
    if isinstance(optimizer, dict):
        raise CheckpointArgumentError("load_checkpoint loads into an optimizer object, not a state dict.")
    if saved is None:
        raise CheckpointKeyError(f"tag {tag!r} holds no optimizer state; pass optimizer=None.")
    if saved != given:
        raise CheckpointArgumentError(
            f"tag {tag!r} holds {'ZeRO-1' if saved == ZERO1 else 'plain'} optimizer state, but the optimizer given is "
            f"{'ZeRO-1' if given == ZERO1 else 'plain'}; build the optimizer as it was when saving."
        )
    now = current_placement().tp_size
    if marker.get("tensor_parallel_size") != now:
        raise ReshardError(
            f"tag {tag!r} was saved at tensor_parallel_size={marker.get('tensor_parallel_size')} and its optimizer "
            f"state loads only there (now {now}); load the model alone (optimizer=None) to continue at another size."
        )
    dp_size = marker.get("data_parallel_size")
    if saved == ZERO1 and (isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1):
        raise CheckpointCorruptError(f"tag {tag!r} records data_parallel_size={dp_size!r}; its checkpoint.json is damaged.")


def _check_optimizer_state(optimizer, state, tag: str) -> None:
    """Raise OptimizerStateError unless `state` fits `optimizer` (groups, parameter counts, state shapes)."""
    inner = optimizer.optimizer if isinstance(optimizer, NxDOptimizer) else optimizer
    damaged = OptimizerStateError(
        f"the optimizer state of tag {tag!r} does not fit this optimizer: it was saved for another model or another "
        "optimizer (parameter groups, counts or shapes differ); load it into the model and optimizer it was saved with."
    )
    if not isinstance(state, dict):
        raise damaged
    if isinstance(inner, NeuronZero1Optimizer):
        live = inner.state_dict()
        if state.get("format") != live["format"] or state.get("sharding") != live["sharding"]:
            raise damaged
        return
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(inner.param_groups) or any(
        not isinstance(saved, dict) or len(saved.get("params", ())) != len(live["params"])
        for saved, live in zip(groups, inner.param_groups)
    ):
        raise damaged
    params = {index: param for saved, live in zip(groups, inner.param_groups) for index, param in zip(saved["params"], live["params"])}
    per_param = state.get("state")
    if not isinstance(per_param, dict):
        raise damaged
    for index, values in per_param.items():
        if index not in params or not isinstance(values, dict):
            raise damaged
        for value in values.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise damaged

"""`save` and `load`: sharded checkpoints across the TP x DP job, and unsharded ones into a sharded model.

save: global rank 0 locks the folder (a concurrent save raises
CheckpointBusyError); DP rank 0 of each TP rank writes its shard file
(`checkpoint_format`); global rank 0 then writes the manifest, the step that
makes the checkpoint visible, and every rank returns once it is (or raises the
same error, the failed save's files removed), the writers after deleting, in
parallel, the files of the checkpoint it replaced.

load: every rank first checks what it will read (the manifest's schema, each
shard file's header, TP rank and save against the manifest, keys, shapes, TP
degree, checksums) without touching the model; only when every rank passed does
it read, and every cross-rank step after that is decided from values that all
ranks agreed on. Into a model, tensors are read and copied one at a time (peak memory: the
model plus one tensor), every rank at once. A load that returns tensors beyond
the model (optimizer state, or the whole dict without a model) holds up to a
full shard, so there the ranks of each host take turns, one at a time: no two
processes on a host hold a shard beyond their model at once.

Sharding of the saved tensors: model tensors are sharded as the attributes
that the parallel layers put on their `state_dict()` entries say. Optimizer state (torch layout:
"state" and "param_groups") of a sharded parameter is sharded like it when it
has the parameter's shape. Optimizer index i is matched to the model entry
named by its group's `param_names` (optimizers built from
`model.named_parameters()`), otherwise to the i-th entry of the model's state
dict (optimizers built from `model.parameters()` on a model without persistent
buffers), checked by shape; state that cannot be matched is saved per rank and
loads only at the same TP degree. Everything else is replicated: on resharding
it comes from the source TP rank of the same index, else TP rank 0.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections import Counter
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn

from .. import folder_lock
from ..errors import (
    CheckpointArgumentError,
    CheckpointBusyError,
    CheckpointKeyError,
    CheckpointShapeError,
    NeuronxDistributedError,
    UnsafeCheckpointError,
)
from . import checkpoint_format as fmt
from .resharding import (
    Part,
    check_divisible,
    logical_size,
    partition_parts,
    read_shard,
    replicated,
    shard_shape,
    stride_parts,
)
from .sharded_source import ShardedSource, Target
from .state_tree import TensorRef, decode, flatten
from .unsharded import load_torch_file, open_unsharded
from .upstream_checkpoint import UpstreamCheckpoint, UpstreamSource, find_upstream_folder
from .checkpoint_agreement import Placement, agree, as_read_error, as_save_error, current_placement
from .checkpoint_plan import RankReport, SavePlan, build_plan, fingerprint
from .layouts import Layout, model_layouts
from .model_state import find_model_state as _model_state
from .utils import tensor_model_parallel_attributes
from .weight_loading import get_checkpoint_parts, get_weight_loader


# ---------------------------------------------------------------- save


def _optimizer_states(state):
    """Every dict in `state` laid out like `torch.optim.Optimizer.state_dict()`."""
    if isinstance(state, dict):
        groups = state.get("param_groups")
        if isinstance(state.get("state"), dict) and isinstance(groups, list) and all(isinstance(g, dict) and "params" in g for g in groups):
            yield state
            return
        for value in state.values():
            yield from _optimizer_states(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _optimizer_states(value)


def _optimizer_param_keys(optimizer_state: dict, model: dict) -> dict:
    """Optimizer parameter index -> model state-dict key (see the module docstring)."""
    groups = optimizer_state["param_groups"]
    if all(len(g.get("param_names", ())) == len(g["params"]) for g in groups):
        return {index: name for g in groups for index, name in zip(g["params"], g["param_names"]) if name in model}
    keys = list(model)
    return {index: keys[index] for g in groups for index in g["params"] if isinstance(index, int) and 0 <= index < len(keys)}


def _sharded_layout(layout: Layout) -> tuple:
    """(layout, partition_dim, stride, parts) of a sharded tensor; parts only where a stride cannot say it."""
    dim, stride, parts = layout.partition_dim, layout.stride, layout.parts
    if parts is None:
        return fmt.SHARDED, dim, stride, None
    if not replicated(parts) and len({part.size for part in parts}) == 1:
        return fmt.SHARDED, dim, len(parts), None
    return fmt.SHARDED, dim, 1, [asdict(part) for part in parts]


def _declared_layouts(model_state: dict, model: nn.Module | None) -> dict[str, Layout]:
    """Model state-dict key -> layout: as `model`'s layers declare them, else as the tensors' attributes say.

    With `model`, the state's model dict must have the model's keys, and each sharded
    entry the shape of the model's shard (a copy or cast of `model.state_dict()`).
    """
    if model is None:
        return {key: layout for key, value in model_state.items()
                if isinstance(value, torch.Tensor) and (layout := Layout.of(value)) is not None}
    own = model.state_dict(keep_vars=True)
    layouts = model_layouts(model)
    unknown = sorted(set(model_state) - set(own))
    if unknown:
        raise CheckpointArgumentError(
            f"the state's model dict has keys {unknown[:10]} that the model passed as model= does not have; pass the "
            "model whose state dict (or a copy or cast of it) is saved."
        )
    for key, value in model_state.items():
        layout = layouts.get(key)
        if layout is not None and layout.sharded and isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            raise CheckpointArgumentError(
                f"'{key}' has shape {tuple(value.shape)} in the state but the model's shard has "
                f"{tuple(own[key].shape)}; save this rank's shards (model.state_dict(), or a copy or cast of it)."
            )
    return layouts


def _layouts(state, model_key: str | None, model: nn.Module | None = None) -> dict[int, tuple]:
    """id(tensor) -> (layout, partition_dim, stride, parts) for every tensor whose layout is not `replicated`."""
    model_state = _model_state(state, model_key)
    if model_state is None:
        if model is not None:
            raise CheckpointArgumentError(
                f"save(..., model=...) found no model state dict in the state (under model_key {model_key!r}, or the "
                "state itself as a dict of tensors); pass the model_key it is saved under."
            )
        return {}
    declared = _declared_layouts(model_state, model)
    layouts = {}
    for key, value in model_state.items():
        layout = declared.get(key)
        if isinstance(value, torch.Tensor) and layout is not None and layout.sharded:
            layouts[id(value)] = _sharded_layout(layout)
    for optimizer_state in _optimizer_states(state):
        param_keys = _optimizer_param_keys(optimizer_state, model_state)
        matched, found = {}, True
        for index, per_param in optimizer_state["state"].items():
            param = model_state.get(param_keys.get(index))
            for value in per_param.values() if isinstance(per_param, dict) else ():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    continue
                if not isinstance(param, torch.Tensor) or value.shape != param.shape:
                    found = False
                elif id(param) in layouts:
                    matched[id(value)] = layouts[id(param)]
        if found:
            layouts.update(matched)
        else:
            for per_param in optimizer_state["state"].values():
                for value in per_param.values() if isinstance(per_param, dict) else ():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        layouts[id(value)] = (fmt.LOCAL, None, 1, None)
    return layouts


def _storable(tensors: dict[str, torch.Tensor], down_cast_bf16: bool = False) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors' requirements); float32 ones as
    bfloat16 with `down_cast_bf16`."""
    storable, storages = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if down_cast_bf16 and tensor.dtype == torch.float32:
            tensor = tensor.to(torch.bfloat16)
        pointer = tensor.untyped_storage().data_ptr()
        if pointer and pointer in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        storable[name] = tensor
    return storable


def _model_tensor_names(flat, state, model_key: str | None) -> set[str]:
    """Names (in `flat`) of the tensors of the model's state dict inside `state`."""
    model = _model_state(state, model_key)
    if model is None:
        return set()
    ids = {id(value) for value in model.values() if isinstance(value, torch.Tensor)}
    return {name for name, tensor in flat.tensors.items() if id(tensor) in ids}


def _rank_report(state, model_key, placement: Placement, model: nn.Module | None = None, down_cast_bf16: bool = False):
    """(this rank's `RankReport`, its storable tensors, its state structure): what the save plan is built from.

    Every tensor saved as replicated gets a fingerprint (crc32) when TP > 1, so that
    the plan writes it once if it is the same on every TP rank, and refuses a model
    tensor whose copies differ (a shard that lost its layout).
    """
    flat = flatten(state)
    for name, tensor in flat.tensors.items():
        if fmt.dtype_name(tensor.dtype) not in fmt.SAFETENSORS_DTYPES or tensor.layout != torch.strided:
            raise UnsafeCheckpointError(
                f"cannot save '{name}': a {tensor.layout} tensor of dtype {tensor.dtype}, which safetensors cannot hold "
                f"(dense tensors of {sorted(fmt.SAFETENSORS_DTYPES)}); convert it before saving."
            )
    layouts = _layouts(state, model_key, model)
    tensors = _storable(flat.tensors, down_cast_bf16)
    model_names = _model_tensor_names(flat, state, model_key) if placement.tp_size > 1 else set()
    entries, fingerprints = {}, {}
    for name, tensor in flat.tensors.items():
        layout, dim, stride, parts = layouts.get(id(tensor), (fmt.REPLICATED, None, 1, None))
        stored = tensors[name]
        entries[name] = fmt.TensorEntry(list(stored.shape), fmt.dtype_name(stored.dtype), layout, dim, stride, parts)
        if layout == fmt.REPLICATED and placement.tp_size > 1:
            fingerprints[name] = fingerprint(stored)
    has_model_key = isinstance(state, dict) and model_key in state
    report = RankReport(placement.tp_rank, entries, fingerprints, frozenset(model_names), model_key if has_model_key else None)
    return report, tensors, flat.structure


def _lock_folder(save_dir: str) -> int:
    """Create `save_dir` if needed and lock it for this save; typed errors for a file in the way or a save in progress."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise CheckpointArgumentError(f"save_dir {save_dir!r} is a file; pass a folder (it is created if missing).")
    os.makedirs(save_dir, exist_ok=True)
    try:
        return folder_lock.acquire(save_dir, fmt.SAVE_LOCK_NAME)
    except folder_lock.FolderBusy as busy:
        raise CheckpointBusyError(
            f"{busy} is saving a checkpoint to {save_dir!r} right now; two saves to one folder cannot both win. "
            "Wait for it to finish, or save to another folder."
        ) from None


def save(state_dict, save_dir: str, model_key: str | None = "model", *, model: nn.Module | None = None,
         down_cast_bf16: bool = False, master_dp_only: bool = True, save_xser: bool = False,
         save_serially: bool = False) -> None:
    """Save `state_dict` as a sharded checkpoint at `save_dir`, replacing any checkpoint there atomically.

    Every rank calls it with its own state dict. The writers (DP rank 0 of each TP
    rank) first agree on a plan (`checkpoint_plan`: which tensor goes into which
    file; a replicated tensor that is the same on every TP rank is written once, by
    TP rank 0); then each writes `save_dir/tp_rank_XX/`, global rank 0 writes the
    manifest last, and every rank returns once the checkpoint is complete.
    `model_key` names the entry holding `model.state_dict()` (the seed's 'model'); a
    state dict of tensors alone is the model itself. If any rank fails, every rank
    raises and the previous checkpoint at `save_dir` (if any) stays the one that
    loads; the files the failed save wrote are removed.

    Global rank 0 holds a lock on `save_dir` (`folder_lock`) from the first file
    written to the last one removed: a second save to the same folder meanwhile,
    from this job or another, raises CheckpointBusyError on every rank of its job.
    Model tensors without a sharded layout are checked to be identical on every TP
    rank (one crc32 each) before anything is written; a copied or cast state dict,
    whose shards lost their attributes, raises ReplicatedMismatchError instead of
    saving shards as if they were whole tensors, unless `model` is given.

    `model`: the model whose state dict (or a copy or cast of it, such as
    `{k: v.clone()}` or `.to(torch.bfloat16)` of each entry) is saved; the layouts
    then come from what its layers declare (`layouts.model_layouts`) instead of the
    tensors' attributes, which copies lose.

    Upstream NxD's keyword arguments, with their meaning here:
    `down_cast_bf16=True` stores every float32 tensor as bfloat16 (upstream's cast);
    `save_serially=True` makes the writing ranks of each host take turns, one shard
    file at a time (upstream staggers its writes the same way to bound host memory;
    its default is True, ours False: each rank streams its own tensors);
    `save_xser` is a layout choice upstream (one file per tensor, for XLA) that has
    no counterpart here: either value writes this format, whose tensors are already
    stored one by one and never pickled; `master_dp_only=True` (the default, as
    upstream) is what this format does: DP rank 0 writes. Upstream's False writes a
    copy per DP rank; here that raises CheckpointArgumentError (every DP rank holds
    the same model; ZeRO-1's per-DP-rank optimizer state is saved with
    `optimizer.checkpoint.save_optimizer_state`).
    """
    placement = current_placement()
    lock, error = None, None
    try:
        save_dir = os.fspath(save_dir)
        if model_key is not None and not isinstance(model_key, str):
            raise CheckpointArgumentError(f"model_key must be a string or None, got {type(model_key).__name__}.")
        if model is not None and not isinstance(model, nn.Module):
            raise CheckpointArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        for name, value in (("down_cast_bf16", down_cast_bf16), ("master_dp_only", master_dp_only),
                            ("save_xser", save_xser), ("save_serially", save_serially)):
            if not isinstance(value, bool):
                raise CheckpointArgumentError(f"{name} must be True or False, got {value!r:.40}.")
        if not master_dp_only:
            raise CheckpointArgumentError(
                "save(..., master_dp_only=False) would write a copy of the checkpoint per DP rank; every DP rank "
                "holds the same model, so this format stores it once (DP rank 0). Drop the argument; save ZeRO-1's "
                "per-DP-rank optimizer state with neuronx_distributed.optimizer.checkpoint.save_optimizer_state."
            )
        if not placement.distributed or dist.get_rank() == 0:
            lock = _lock_folder(save_dir)
    except Exception as caught:  # reported to every rank below
        error = caught
    try:
        started = agree(placement, error and as_save_error(error, str(save_dir)), "starting the save", uuid.uuid4().hex)
        _save_locked(state_dict, save_dir, started[0], model_key, placement, model, down_cast_bf16, save_serially)
    finally:
        if lock is not None:
            folder_lock.release(save_dir, fmt.SAVE_LOCK_NAME, lock)


def plan_save(state_dict, model_key: str | None = "model", *, model: nn.Module | None = None,
              down_cast_bf16: bool = False) -> SavePlan:
    """The plan `save` would follow for this state (every rank calls it; the same plan on every rank)."""
    placement = current_placement()
    return _agreed_plan(placement, *_planned(state_dict, model_key, placement, model, down_cast_bf16)[:2])


def _planned(state_dict, model_key, placement: Placement, model, down_cast_bf16: bool):
    """(its error or None, this rank's report, (its tensors, structure)) on a writer rank; (None, None, None) elsewhere."""
    if placement.dp_rank != 0:
        return None, None, None
    try:
        report, tensors, structure = _rank_report(state_dict, model_key, placement, model, down_cast_bf16)
    except Exception as caught:  # reported to every rank
        return caught, None, None
    return None, report, (tensors, structure)


def _agreed_plan(placement: Placement, error, report) -> SavePlan:
    """Every rank builds the plan from the writers' reports (raising on every rank if a report failed)."""
    reports = [r for r in agree(placement, error, "planning the save", report) if r is not None]
    return build_plan(sorted(reports, key=lambda r: r.tp_rank))


def _save_locked(state_dict, save_dir: str, save_id: str, model_key: str | None, placement: Placement,
                 model: nn.Module | None, down_cast_bf16: bool = False, save_serially: bool = False) -> None:
    """The save once every rank started it: the plan, the shard files, the manifest, each step agreed by `agree`
    (the save id is global rank 0's)."""
    writes = placement.dp_rank == 0
    error, report, local = _planned(state_dict, model_key, placement, model, down_cast_bf16)
    plan = _agreed_plan(placement, error and as_save_error(error, save_dir), report)
    my_turn, turns = _host_turns(placement) if save_serially else (0, 1)
    files = []
    try:
        for turn in range(turns):
            error, written = None, None
            if writes and turn == my_turn:
                tensors, structure = local
                try:
                    mine = {name: tensors[name] for name in plan.files[placement.tp_rank]}
                    written = (placement.tp_rank, fmt.write_shard_file(save_dir, placement.tp_rank, save_id, mine, structure))
                except Exception as caught:  # reported to every rank
                    error = as_save_error(caught, save_dir)
            files += [entry for entry in agree(placement, error, "writing the shard files", written) if entry]
        manifest = fmt.Manifest(placement.tp_size, save_id, plan.model_key, [f for _, f in sorted(files)], plan.tensors)
        error = None
        if not placement.distributed or dist.get_rank() == 0:
            try:
                fmt.write_manifest(save_dir, manifest)
            except Exception as caught:  # reported to every rank
                error = as_save_error(caught, save_dir)
        agree(placement, error, "writing the manifest")
    except BaseException:
        if writes:
            fmt.remove_shard_file(save_dir, placement.tp_rank, save_id)
        raise
    if writes:
        _remove_previous_files(save_dir, manifest, placement.tp_rank)
    if placement.distributed:
        dist.barrier()  # every writer is done deleting before rank 0 releases the folder


def _remove_previous_files(save_dir: str, manifest: fmt.Manifest, tp_rank: int) -> None:
    """Each writing rank deletes its share of the files the new checkpoint replaced; a failure only warns."""
    try:
        fmt.remove_stale(save_dir, manifest, tp_rank)
    except OSError as error:
        warnings.warn(
            f"the checkpoint at {save_dir!r} is saved, but files of the one it replaced could not be removed ({error}); "
            "they are not part of the checkpoint and can be deleted (`nxd checkpoint verify` lists them).",
            stacklevel=4,
        )


# ---------------------------------------------------------------- load


def _tie_groups(targets: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Model key -> every key of the same tensor object (tied weights)."""
    by_object: dict[int, list[str]] = {}
    for key, tensor in targets.items():
        by_object.setdefault(id(tensor), []).append(key)
    return {key: by_object[id(tensor)] for key, tensor in targets.items()}


def _match_keys(model: nn.Module, targets: dict, available, strict: bool) -> dict[str, str]:
    """Model key -> checkpoint key to read it from (a tied alias counts); raises on mismatches when strict.

    Keys of the model's non-persistent buffers (which it computes itself, such as
    Hugging Face BERT's `position_ids`) are ignored: checkpoints often carry them.
    """
    non_persistent = {name for name, _ in model.named_buffers()} - set(targets)
    available = set(available) - non_persistent
    ties = _tie_groups(targets)
    sources = {}
    for key in targets:
        alias = next((candidate for candidate in ties[key] if candidate in available), None)
        if alias is not None:
            sources[key] = alias
    missing = sorted(set(targets) - set(sources))
    unexpected = sorted(available - set(targets))
    if strict and (missing or unexpected):
        raise CheckpointKeyError(
            f"the checkpoint does not match the model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}; "
            "load into the model the checkpoint was saved from (or pass strict=False to skip them)."
        )
    return sources


def _check_shape(key: str, target: torch.Tensor, shape: list[int], source_shape: list[int] | None = None) -> None:
    if list(target.shape) != list(shape):
        whole = f" (this rank's shard of {source_shape})" if source_shape is not None and source_shape != shape else ""
        raise CheckpointShapeError(
            f"'{key}': the checkpoint gives shape {tuple(shape)}{whole} but the model has {tuple(target.shape)}; "
            "build the model with the sizes it was saved with."
        )


def _check_sharding(key: str, target: torch.Tensor, entry: fmt.TensorEntry, world_size: int) -> None:
    attributes = tensor_model_parallel_attributes(target)
    if world_size == 1 or not attributes.get("tensor_model_parallel"):
        return
    if entry.layout == fmt.SHARDED and (entry.parts is not None or "partition_parts" in attributes):
        if entry.partition_dim != attributes["partition_dim"]:
            raise CheckpointShapeError(
                f"'{key}' is sharded along dim {attributes['partition_dim']} in the model but the checkpoint saved it "
                f"along dim {entry.partition_dim}; load into the same kind of layer."
            )
        return  # the parts (and their replication) are mapped through the logical tensor
    saved = (entry.partition_dim, entry.partition_stride) if entry.layout == fmt.SHARDED else None
    wanted = (attributes["partition_dim"], attributes["partition_stride"])
    if saved != wanted:
        raise CheckpointShapeError(
            f"'{key}' is sharded along dim {wanted[0]} with stride {wanted[1]} in the model but the checkpoint "
            f"saved it {'along dim %d with stride %d' % saved if saved else 'unsharded'}; load into the same kind of layer."
        )


def _target_layout(target: torch.Tensor, entry: fmt.TensorEntry, placement: Placement) -> Target | None:
    """The layout a model parameter wants a sharded checkpoint tensor in, where parts or replication are involved.

    None where neither side has parts (the saved stride is cut as before). A parameter
    without parts is a plain shard of the logical tensor, or the whole of it when it is
    not tensor-parallel.
    """
    parts = partition_parts(target)
    if entry.layout != fmt.SHARDED or (parts is None and entry.parts is None):
        return None
    if parts is not None:
        return Target(tuple(parts), placement.tp_rank, placement.tp_size)
    attributes = tensor_model_parallel_attributes(target)
    if attributes.get("tensor_model_parallel") and placement.tp_size > 1:
        rows = target.shape[entry.partition_dim] * placement.tp_size if target.dim() > entry.partition_dim else 0
        return Target(stride_parts(rows, attributes["partition_stride"]), placement.tp_rank, placement.tp_size)
    return Target((Part(logical_size(entry.row_parts())),), 0, 1)


def _host_turns(placement: Placement) -> tuple[int, int]:
    """(this rank's turn, number of turns): the ranks of each host take turns in rank order."""
    if not placement.distributed:
        return 0, 1
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    me = dist.get_rank()
    return [rank for rank, host in enumerate(hosts) if host == hosts[me]].index(me), max(Counter(hosts).values())


def _in_turns(placement: Placement, work, take_turns: bool, path: str) -> object:
    """Run `work()` on every rank (each host's ranks one at a time if `take_turns`); raise everywhere if it failed anywhere.

    `take_turns` must be the same on every rank: it decides which collectives follow.
    """
    my_turn, turns = _host_turns(placement) if take_turns else (0, 1)
    result = None
    for turn in range(turns):
        error = None
        if turn == my_turn:
            try:
                result = work()
            except Exception as caught:  # reported to every rank
                error = as_read_error(caught, path)
        agree(placement, error, "loading the checkpoint")
    return result


@torch.no_grad()
def _copy_into(targets: dict[str, torch.Tensor], sources: dict[str, str], read) -> None:
    for key, source_key in sources.items():
        targets[key].copy_(read(source_key))


def _refs(tree) -> list[str]:
    """Names of the `TensorRef`s in a decoded tree."""
    if isinstance(tree, TensorRef):
        return [tree.name]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [name for item in items for name in _refs(item)]


def _resolved(tree, read):
    """`tree` with each `TensorRef` replaced by `read(name)`."""
    if isinstance(tree, TensorRef):
        return read(tree.name)
    if isinstance(tree, dict):
        return {key: _resolved(value, read) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_resolved(value, read) for value in tree)
    return tree


def _load_sharded(load_dir, model, model_key, strict, verify, placement, load_xser=None):
    """Check a sharded load (ours, or upstream's layout); return (its read phase, whether that returns tensors
    beyond the model)."""
    if find_upstream_folder(load_dir) is not None:
        checkpoint = UpstreamCheckpoint(load_dir, load_xser)
        layouts = model_layouts(model) if model is not None else {}
        source = UpstreamSource(checkpoint, model_key, layouts, placement.tp_rank, placement.tp_size)
        return _sharded_read_phase(source, source.tree, model, model_key, strict, placement, verify=False)  # no checksums
    if load_xser:
        raise CheckpointArgumentError(
            f"load_xser=True reads upstream NeuronxDistributed's xser layout, but {load_dir!r} holds none; leave "
            "load_xser out (the layout is detected)."
        )
    source = ShardedSource(load_dir, fmt.read_manifest(load_dir), placement.tp_rank, placement.tp_size)
    return _sharded_read_phase(source, decode(source.structure, TensorRef), model, model_key, strict, placement, verify)


def _sharded_read_phase(source: ShardedSource, tree, model, model_key, strict, placement, verify: bool):
    """Check the load of `tree` (this rank's state, `TensorRef`s read from `source`), with the checksums of what it
    reads if `verify`; return (its read phase, whether that returns tensors beyond the model)."""
    load_dir, manifest = source.load_dir, source.manifest
    targets, sources, rest, layouts = None, {}, tree, {}
    if model is not None:
        model_tree = _model_state(tree, model_key, TensorRef)
        if model_tree is None:
            keys = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
            raise CheckpointKeyError(
                f"model_key {model_key!r} is not in the checkpoint at {load_dir!r} (its top-level keys: {keys}); "
                "pass the key the model's state dict was saved under."
            )
        targets = model.state_dict(keep_vars=True)
        refs = {key: value.name for key, value in model_tree.items() if isinstance(value, TensorRef)}
        sources = {key: refs[alias] for key, alias in _match_keys(model, targets, refs, strict).items()}
        for key, name in sources.items():
            entry = manifest.tensors[name]
            layout = _target_layout(targets[key], entry, placement)
            if layout is not None:
                layouts[name] = layout
            source.check_loadable([name], layouts)
            _check_shape(key, targets[key], source.local_shape(name, layout), entry.logical_shape)
            _check_sharding(key, targets[key], entry, placement.tp_size)
        rest = {key: value for key, value in tree.items() if key != model_key} if model_tree is not tree else {}
    rest_names = _refs(rest)
    source.check_loadable(rest_names)
    if verify:
        source.verify([*sources.values(), *rest_names], layouts)

    def read_phase():
        if targets is not None:
            with torch.no_grad():
                for key, name in sources.items():  # straight from the mapped shards into the model's tensors
                    source.read_into(targets[key], name, layouts.get(name))
        return _resolved(rest, source.read)

    return read_phase, bool(rest_names)


def _load_unsharded(path, model, model_key, strict, placement):
    """Check an unsharded load into `model`; return (its read phase, False: it returns nothing)."""
    targets = model.state_dict(keep_vars=True)
    source = _JoinedParts.around(open_unsharded(path, model_key), targets)
    sources = _match_keys(model, targets, source.keys(), strict)
    plans = {}
    loaders = {}
    for key, source_key in sources.items():
        target, shape = targets[key], source.shape(source_key)
        attributes = tensor_model_parallel_attributes(target)
        if get_weight_loader(target) is not None:
            loaders[source_key] = (key, shape, get_weight_loader(target))
            # A dry run on meta tensors: a loader's refusal or a wrong shard shape shows here,
            # in the check phase, before any tensor of the model is changed.
            dry = get_weight_loader(target)(shape, _meta_reader(shape, target.dtype))
            _check_shape(key, target, list(dry.shape), shape)
        elif placement.tp_size > 1 and attributes.get("tensor_model_parallel"):
            dim, stride = attributes["partition_dim"], attributes["partition_stride"]
            if dim >= len(shape):
                _check_shape(key, target, shape)
            check_divisible(source_key, shape, dim, stride, placement.tp_size)
            _check_shape(key, target, shard_shape(shape, dim, placement.tp_size), shape)
            plans[source_key] = (shape, dim, stride)
        else:
            _check_shape(key, target, shape)

    def read(source_key):
        if source_key in loaders:
            key, shape, loader = loaders[source_key]
            shard = loader(shape, lambda dim, start, stop: source.read(source_key, dim, start, stop))
            _check_shape(key, targets[key], list(shard.shape), shape)
            return shard
        if source_key not in plans:
            return source.read(source_key)
        shape, dim, stride = plans[source_key]
        return read_shard(
            shape, dim, stride, 1, placement.tp_rank, placement.tp_size,
            lambda _, start, stop: source.read(source_key, dim, start, stop),
        )

    rest = _unsharded_rest(path, model_key)

    def read_phase():
        _copy_into(targets, sources, read)
        return _owned(rest)

    return read_phase, bool(_tensors_in(rest))


def _unsharded_rest(path: str, model_key: str | None):
    """What upstream's `load(..., sharded=False)` returns: a torch.save file's dict without its `model_key`
    entry; None for a bare state dict, model_key=None, a safetensors file or a Hugging Face folder."""
    if model_key is None or os.path.isdir(path) or path.endswith(".safetensors"):
        return None
    loaded = load_torch_file(path)
    if not isinstance(loaded, dict) or model_key not in loaded:
        return None
    return {key: value for key, value in loaded.items() if key != model_key}


def _tensors_in(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [tensor for item in items for tensor in _tensors_in(item)]


def _owned(tree):
    """`tree` with each (memory-mapped) tensor copied into memory of its own, so a later write to its file cannot
    change or fault it."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {key: _owned(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        return type(tree)(_owned(value) for value in tree)
    return tree


def _meta_reader(shape: list[int], dtype: torch.dtype):
    """A reader of a full tensor of `shape` that returns meta tensors of the slices' shapes (no I/O)."""

    def read(dim, start, stop):
        sliced = list(shape)
        if dim is not None:
            sliced[dim] = stop - start
        return torch.empty(sliced, dtype=dtype, device="meta")

    return read


class _JoinedParts:
    """An unsharded source where a fused parameter's full tensor, stored as several tensors, appears under its own key.

    The parameter names its parts (`weight_loading.set_checkpoint_parts`); they are joined
    (concatenated along dim 0) when the checkpoint lacks the parameter's key but has them all.
    """

    def __init__(self, source, joined: dict[str, list[str]]):
        self.source, self.joined = source, joined
        self._hidden = {part for parts in joined.values() for part in parts}

    @classmethod
    def around(cls, source, targets: dict[str, torch.Tensor]):
        available, joined = set(source.keys()), {}
        for key, target in targets.items():
            names = get_checkpoint_parts(target)
            prefix = key.rpartition(".")[0]
            parts = [f"{prefix}.{name}" if prefix else name for name in names or ()]
            if names and key not in available and all(part in available for part in parts):
                joined[key] = parts
        return cls(source, joined) if joined else source

    def keys(self) -> list[str]:
        return [key for key in self.source.keys() if key not in self._hidden] + list(self.joined)

    def shape(self, key: str) -> list[int]:
        if key not in self.joined:
            return self.source.shape(key)
        shapes = [self.source.shape(part) for part in self.joined[key]]
        if any(len(shape) == 0 or shape[1:] != shapes[0][1:] for shape in shapes):
            raise CheckpointShapeError(
                f"'{key}' is stored as {self.joined[key]} of shapes {shapes}, which do not concatenate along dim 0; "
                "load the checkpoint of the model this layer was built for."
            )
        return [sum(shape[0] for shape in shapes), *shapes[0][1:]]

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if key not in self.joined:
            return self.source.read(key, dim, start, stop)
        pieces, offset = [], 0
        for part in self.joined[key]:
            rows = self.source.shape(part)[0]
            if dim is None:
                pieces.append(self.source.read(part))
            elif dim != 0:
                pieces.append(self.source.read(part, dim, start, stop))
            elif start < offset + rows and stop > offset:
                pieces.append(self.source.read(part, 0, max(start - offset, 0), min(stop - offset, rows)))
            offset += rows
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def load(load_dir: str, model: nn.Module | None = None, model_key: str | None = "model", sharded: bool = True,
         strict: bool = True, verify: bool = True, *, model_or_optimizer=None, load_xser: bool | None = None,
         weights_only: bool = True):
    """Load this rank's part of a checkpoint, resharding it to the current TP degree.

    `sharded=True` reads a checkpoint of `save`, saved at any TP degree that the
    current one can cut (the manifest says how), or one that upstream
    NeuronxDistributed saved (`upstream_checkpoint`: its layouts come from `model`).
    With `model`, its entries under `model_key` are copied into the model and the
    rest of the checkpoint dict is returned; without, the whole dict is returned.
    `sharded=False` loads a torch.save file (state dict under `model_key` or bare), a
    safetensors file or a Hugging Face model folder into `model`, each rank reading
    only its slices, and returns, as upstream does, the rest of a torch.save file's
    dict beside its `model_key` entry (None for anything else). `strict=False` skips
    missing and unexpected keys; `verify=False` skips the checksums. Nothing in the
    model changes unless every rank can load: every rank checks the manifest against
    the shard files it will read (rank, save, names, dtypes, shapes; checksums unless
    verify=False) and the ranks agree on the outcome before any of them reads into
    the model.

    Upstream's arguments: `model_or_optimizer` is upstream's name for `model`; given
    an optimizer, its state is loaded (`load_state_dict`) from the checkpoint's
    `model_key` entry (the whole dict with model_key=None), as saved at this TP
    degree, and the rest is returned (None with model_key=None). `weights_only`: every
    load here is weights-only (tensors and plain containers, never pickled objects);
    weights_only=False raises CheckpointArgumentError instead of unpickling, unlike
    upstream. `load_xser` chooses the layout of an upstream folder: True the xser
    layout, False the torch.save one, None (the default) detects it.
    """
    placement = current_placement()
    read_phase, returns_tensors, error, optimizer = None, False, None, None
    try:
        load_dir = os.fspath(load_dir)
        model, optimizer = _model_or_optimizer(model, model_or_optimizer, sharded)
        _check_load_arguments(model, model_key, sharded, strict, verify)
        _check_upstream_arguments(load_xser, weights_only, sharded)
        if sharded:
            read_phase, returns_tensors = _load_sharded(load_dir, model, model_key, strict, verify, placement, load_xser)
        elif model is None:
            raise CheckpointArgumentError(
                "load(..., sharded=False) needs the model to load into: an unsharded checkpoint is sliced by the "
                "model's parameters; pass model=your_model."
            )
        else:
            read_phase, returns_tensors = _load_unsharded(load_dir, model, model_key, strict, placement)
    except Exception as caught:  # every rank learns about it before any model changes
        error = as_read_error(caught, str(load_dir))
    take_turns = any(agree(placement, error, "checking the checkpoint", returns_tensors))
    loaded = _in_turns(placement, read_phase, take_turns, load_dir)
    return loaded if optimizer is None else _into_optimizer(placement, optimizer, loaded, model_key, load_dir)


def _model_or_optimizer(model, model_or_optimizer, sharded: bool) -> tuple:
    """(model, optimizer) from `model` and upstream's `model_or_optimizer`."""
    if model_or_optimizer is None:
        return model, None
    if model is not None and model is not model_or_optimizer:
        raise CheckpointArgumentError(
            "pass the model once: as model= or as model_or_optimizer= (upstream's name), not both."
        )
    if isinstance(model_or_optimizer, nn.Module):
        return model_or_optimizer, None
    if not callable(getattr(model_or_optimizer, "load_state_dict", None)):
        raise CheckpointArgumentError(
            f"model_or_optimizer must be a torch.nn.Module or an optimizer, got {type(model_or_optimizer).__name__}."
        )
    if not sharded:
        raise CheckpointArgumentError(
            "an optimizer's state loads from a sharded checkpoint (each TP rank has its own); pass sharded=True."
        )
    return None, model_or_optimizer


def _into_optimizer(placement: Placement, optimizer, loaded, model_key: str | None, load_dir: str):
    """Load `loaded[model_key]` (all of `loaded` with model_key=None) into `optimizer`; return what upstream does:
    the rest of the dict, or None with model_key=None."""
    error, rest = None, None
    try:
        if model_key is None:
            state = loaded
        elif isinstance(loaded, dict) and isinstance(loaded.get(model_key), dict):
            state, rest = loaded[model_key], {key: value for key, value in loaded.items() if key != model_key}
        else:
            keys = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
            raise CheckpointKeyError(
                f"model_key {model_key!r} is not in the checkpoint at {load_dir!r} (its top-level keys: {keys}); "
                "pass the key the optimizer's state dict was saved under (or model_key=None for the whole dict)."
            )
        optimizer.load_state_dict(state)
    except NeuronxDistributedError as caught:
        error = caught
    except Exception as caught:  # the optimizer's own refusal (groups or sizes that differ), on every rank
        error = CheckpointKeyError(
            f"the optimizer state in {load_dir!r} does not fit the optimizer ({type(caught).__name__}: {caught}); "
            "build the optimizer as it was when saved, over the same parameters and TP degree."
        )
    agree(placement, error, "loading the optimizer state")
    return rest


def _check_upstream_arguments(load_xser, weights_only, sharded: bool) -> None:
    if load_xser is not None and not isinstance(load_xser, bool):
        raise CheckpointArgumentError(f"load_xser must be True, False or None (detect), got {load_xser!r:.40}.")
    if load_xser and not sharded:
        raise CheckpointArgumentError(
            "load_xser=True reads an upstream checkpoint folder, which is sharded; pass sharded=True."
        )
    if weights_only is not True:
        raise CheckpointArgumentError(
            f"weights_only={weights_only!r:.40}: this library loads checkpoints weights-only (tensors and plain "
            "containers), never unpickling other objects, since unpickling can run arbitrary code. Leave "
            "weights_only out (or pass True); re-save a checkpoint that holds other objects with plain values."
        )


def _check_load_arguments(model, model_key, sharded, strict, verify) -> None:
    if model is not None and not isinstance(model, nn.Module):
        raise CheckpointArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if model_key is not None and not isinstance(model_key, str):
        raise CheckpointArgumentError(f"model_key must be a string or None, got {type(model_key).__name__}.")
    for name, value in (("sharded", sharded), ("strict", strict), ("verify", verify)):
        if not isinstance(value, bool):
            raise CheckpointArgumentError(f"{name} must be True or False, got {value!r:.40}.")

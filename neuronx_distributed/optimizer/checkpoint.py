"""Sharded optimizer checkpoints, for ZeRO-1 and plain torch optimizers, loadable at any data-parallel size.

    output_dir/optim.manifest.json                                  written last, by an atomic rename
    output_dir/optim.tp_rank_00.dp_rank_00.<save_id>.safetensors    one file per writing rank
    output_dir/optim.tp_rank_00.dp_rank_01.<save_id>.safetensors
    ...

Each parameter is seen as its TP-local tensor, flattened. A file holds, for every
parameter, the optimizer state over one contiguous range of that flat tensor:
`NeuronZero1Optimizer` rank d of a DP group of D holds [d*c, d*c + owned) with
c = ceil(numel / D) (its chunk without the padding); a plain optimizer, written by DP
rank 0 of each TP rank, holds [0, numel). Per parameter, each state entry is
`elementwise` (a tensor with one value per element: Adam's moments, SGD's momentum),
cut along those ranges; `scalar` (a 0-dim tensor, e.g. Adam's step), read from the
DP rank 0 file; or a JSON `value` (None, a number) kept in the manifest. ZeRO-1 also
saves its master chunks (`master/<i>`), which carry the fp32 precision of bf16 training.

The manifest records the global layout: the TP and DP size of the save, each
parameter's TP-local and global shape, dtype and TP partition attributes, the
parameter groups and their hyperparameters, each file's ranges, size and crc32, and
per TP rank the state entries of each parameter. So the state loads at another DP
size and into either kind of optimizer; only the TP degree must be the saved one.

Save: every rank takes part; the writers (ranks of each host in turns of
`num_workers_per_step`) write their file aside and rename it into place, then global
rank 0 writes the manifest (the step that makes the checkpoint visible) and removes
the files of the checkpoint it replaced. Files of a save that failed or was killed
are never referenced, so the previous checkpoint keeps loading; the next save removes them.

Load: every rank checks the manifest, that the checkpoint is of this model at this TP
degree, and the size and crc32 of each file it reads, and builds the new state
without touching the optimizer; only when every rank succeeded does any rank apply
it. Otherwise every rank raises the same typed error and nothing changes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import stat
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open

from .. import folder_lock
from ..durable import replace_with_text
from ..errors import (
    CheckpointArgumentError,
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointShapeError,
    IncompleteCheckpointError,
    OptimizerConfigError,
    ReshardError,
    UnsafeCheckpointError,
)
from ..parallel_layers import checkpoint_format as fmt
from ..parallel_layers.checkpoint_agreement import agree, as_read_error, as_save_error, current_placement
from ..parallel_layers.checkpoint_storage import publish, write_aside, write_safetensors
from ..parallel_layers import parallel_state
from ..parallel_layers.utils import tensor_model_parallel_attributes
from .zero_redundancy_optimizer import NeuronZero1Optimizer, _hyperparameters, _owned_slice

MANIFEST_NAME = "optim.manifest.json"
LOCK_NAME = ".nxd-optim-save.lock"
FORMAT_NAME = "neuronx_distributed.optimizer_state"
FORMAT_VERSION = 1
ELEMENTWISE, SCALAR, VALUE = "elementwise", "scalar", "value"
_FILE = re.compile(r"^optim\.tp_rank_(\d+)\.dp_rank_(\d+)\.([0-9a-f]{1,64})\.safetensors(\.tmp)?$")
_MANIFEST_ASIDE = re.compile(r"^optim\.manifest\.json\.[0-9a-f]+\.tmp$")


def file_name(tp_rank: int, dp_rank: int, save_id: str) -> str:
    """The name of a writer's file inside the checkpoint folder."""
    return f"optim.tp_rank_{tp_rank:02d}.dp_rank_{dp_rank:02d}.{save_id}.safetensors"


def _state_name(index: int, key: str) -> str:
    return f"state/{index}/{key}"


def _master_name(index: int) -> str:
    return f"master/{index}"


# ---------------------------------------------------------------- the optimizer as flat ranges


class _View:
    """One rank's optimizer seen as ranges of its flattened TP-local parameters, in optimizer order.

    `state()` gives per parameter {key: value}: element-wise tensors flattened to this
    rank's range, 0-dim tensors and other values as they are. `load()` takes the same form.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], dp_rank: int, dp_size: int):
        self.optimizer, self.params = optimizer, params
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_size()

    @property
    def writes(self) -> bool:
        return True

    def ranges(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def state(self) -> list[dict]:
        raise NotImplementedError

    def masters(self) -> list[torch.Tensor] | None:
        return None

    def master_dtype(self) -> str | None:
        return None

    def load(self, states: list[dict], masters: list[torch.Tensor] | None, hyperparameters: list[dict]) -> None:
        raise NotImplementedError

    def group_sizes(self) -> list[int]:
        return [len(group["params"]) for group in self.optimizer.param_groups]

    def hyperparameters(self) -> list[dict]:
        """Each group's hyperparameters, checked to be JSON values (our format holds no pickled objects)."""
        groups = [_hyperparameters(group) for group in self.optimizer.param_groups]
        for number, group in enumerate(groups):
            for key, value in group.items():
                _check_json(value, f"hyperparameter {key!r} of parameter group {number}")
        return groups

    def describe(self) -> list[dict]:
        """Each parameter's TP-local shape, dtype and TP attributes, as the manifest records them."""
        described = []
        for param in self.params:
            attributes = tensor_model_parallel_attributes(param)
            sharded = bool(attributes.get("tensor_model_parallel"))
            described.append({
                "shape": list(param.shape), "dtype": fmt.dtype_name(param.dtype), "tensor_model_parallel": sharded,
                "partition_dim": attributes.get("partition_dim") if sharded else None,
                "partition_stride": attributes.get("partition_stride", 1) if sharded else 1,
            })
        return described

    def _merged_groups(self, hyperparameters: list[dict]) -> list[dict]:
        """The current groups' hyperparameters overwritten by the saved ones (tuples kept tuples)."""
        merged = []
        for group, saved in zip(self.optimizer.param_groups, hyperparameters):
            current = _hyperparameters(group)
            merged.append({**current, **{
                key: tuple(value) if isinstance(current.get(key), tuple) and isinstance(value, list) else value
                for key, value in saved.items()
            }})
        return merged

    def _indices(self) -> list[list[int]]:
        sizes, start = self.group_sizes(), 0
        indices = []
        for size in sizes:
            indices.append(list(range(start, start + size)))
            start += size
        return indices


def _flat_state(values: dict, shape: torch.Size, stop: int, where: str) -> dict:
    """A parameter's state entries with each element-wise tensor (of `shape`) flattened and cut to [:stop]."""
    flat = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise UnsafeCheckpointError(f"optimizer state key {key!r} of {where} is not a string; our format names entries by strings.")
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                flat[key] = value.detach()
            elif value.shape == shape:
                flat[key] = value.detach().reshape(-1)[:stop]
            else:
                raise UnsafeCheckpointError(
                    f"optimizer state {key!r} of {where} has shape {tuple(value.shape)}, neither the parameter's "
                    f"{tuple(shape)} nor a scalar; sharded optimizer checkpoints hold element-wise state (SGD, Adam, "
                    "AdamW, ...). Save this optimizer's state_dict() with parallel_layers.save instead."
                )
        else:
            _check_json(value, f"optimizer state {key!r} of {where}")
            flat[key] = value
    return flat


class _Zero1View(_View):
    """A NeuronZero1Optimizer: each rank holds its chunk of every parameter's state and master."""

    def __init__(self, optimizer: NeuronZero1Optimizer):
        if not optimizer.inited:
            raise OptimizerConfigError("this optimizer was built with lazy_init=True; call init_zero() first.")
        self.shards = optimizer._all_shards()
        group = optimizer._sharding_group
        super().__init__(optimizer, [s.param for s in self.shards], dist.get_rank(group), dist.get_world_size(group))

    def ranges(self):
        # A rank past the end of a small parameter owns nothing: an empty range at the end.
        return [(min(s.start, s.param.numel()), min(s.start, s.param.numel()) + s.owned) for s in self.shards]

    def state(self):
        inner = self.optimizer.base_optimizer.state
        return [_flat_state(inner.get(s.master, {}), s.master.shape, s.owned, f"parameter {i}")
                for i, s in enumerate(self.shards)]

    def masters(self):
        return [s.master.detach()[: s.owned] for s in self.shards]

    def master_dtype(self):
        return fmt.dtype_name(self.optimizer.optimizer_dtype)

    def load(self, states, masters, hyperparameters):
        groups = self._merged_groups(hyperparameters)
        inner_state = {
            index: {key: _padded(value, shard.chunk) if isinstance(value, torch.Tensor) and value.dim() else value
                    for key, value in values.items()}
            for index, (shard, values) in enumerate(zip(self.shards, states)) if values
        }
        self.optimizer.base_optimizer.load_state_dict({
            "state": inner_state,
            "param_groups": [{**group, "params": indices} for group, indices in zip(groups, self._indices())],
        })
        for group, loaded in zip(self.optimizer.param_groups, groups):
            group.update(loaded)
        for index, shard in enumerate(self.shards):
            if shard.aliases_param:  # the master is the parameter itself, which the model's own load sets
                continue
            source = _owned_slice(shard) if masters is None else masters[index]
            shard.master.data.zero_()
            shard.master.data[: shard.owned] = source.to(shard.master.dtype)


class _PlainView(_View):
    """A torch optimizer over (possibly TP-sharded) parameters: DP rank 0 of each TP rank writes the whole state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        super().__init__(optimizer, params, parallel_state.get_data_parallel_rank(), 1)

    @property
    def writes(self) -> bool:
        return self.dp_rank == 0

    def ranges(self):
        return [(0, p.numel()) for p in self.params]

    def state(self):
        return [_flat_state(self.optimizer.state.get(p, {}), p.shape, p.numel(), f"parameter {i}")
                for i, p in enumerate(self.params)]

    def load(self, states, masters, hyperparameters):
        groups = self._merged_groups(hyperparameters)
        self.optimizer.load_state_dict({
            "state": {
                index: {key: value.view(param.shape) if isinstance(value, torch.Tensor) and value.dim() else value
                        for key, value in values.items()}
                for index, (param, values) in enumerate(zip(self.params, states)) if values
            },
            "param_groups": [{**group, "params": indices} for group, indices in zip(groups, self._indices())],
        })


def _padded(flat: torch.Tensor, length: int) -> torch.Tensor:
    if flat.numel() == length:
        return flat
    padded = flat.new_zeros(length)
    padded[: flat.numel()] = flat
    return padded


def _view(optimizer) -> _View:
    parallel_state.get_world_group()  # raises unless model parallelism is initialized
    if isinstance(optimizer, NeuronZero1Optimizer):
        return _Zero1View(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        return _PlainView(optimizer)
    raise CheckpointArgumentError(
        f"expected a NeuronZero1Optimizer or a torch.optim.Optimizer, got {type(optimizer).__name__}; "
        "pass the optimizer itself (for a wrapper, the optimizer it wraps)."
    )


def _check_json(value, what: str) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        raise UnsafeCheckpointError(
            f"{what} is a {type(value).__name__}, which our format (safetensors and JSON, no pickle) cannot hold; "
            "use a number, string, bool, None or a list of them."
        ) from None


def _turns(hosts: list[str], rank: int, per_turn: int) -> tuple[int, int]:
    """(this rank's turn, number of turns): each host's ranks, in rank order, `per_turn` at a time."""
    mine = [r for r, host in enumerate(hosts) if host == hosts[rank]].index(rank)
    most = max(hosts.count(host) for host in set(hosts))
    return mine // per_turn, math.ceil(most / per_turn)


def _checked_workers(num_workers_per_step) -> int:
    if isinstance(num_workers_per_step, bool) or not isinstance(num_workers_per_step, int) or num_workers_per_step < 1:
        raise CheckpointArgumentError(f"num_workers_per_step must be an integer >= 1, got {num_workers_per_step!r}.")
    return num_workers_per_step


def _in_turns(turn: int, turns: int, work) -> BaseException | None:
    """Run `work()` in this rank's turn (a barrier after each turn but the last); return the error it raised."""
    error = None
    for current in range(turns):
        if current == turn:
            try:
                work()
            except Exception as caught:  # reported to every rank by the caller
                error = caught
        if current + 1 < turns:
            dist.barrier()
    return error


# ---------------------------------------------------------------- save


def save_optimizer_state(optimizer, output_dir: str, num_workers_per_step: int = 8) -> None:
    """Save `optimizer`'s state (a NeuronZero1Optimizer or a plain torch optimizer) as a sharded checkpoint.

    Every rank calls it. The checkpoint at `output_dir` is replaced atomically: until
    the new manifest is in place the previous one (if any) loads, and if any rank fails
    every rank raises (CheckpointSaveError for I/O, UnsafeCheckpointError for state our
    format cannot hold) and the files the failed save wrote are removed. Ranks of a host
    write `num_workers_per_step` at a time. The model's parameters are not saved here
    (save them with `parallel_layers.save`).
    """
    lock, view, error = None, None, None
    output_dir = os.fspath(output_dir)
    try:
        per_turn = _checked_workers(num_workers_per_step)
        view = _view(optimizer)
        record = {"params": view.describe(), "groups": view.group_sizes(), "hyperparameters": view.hyperparameters()}
        if dist.get_rank() == 0:
            lock = _lock_folder(output_dir)
    except Exception as caught:  # reported to every rank below
        error = as_save_error(caught, output_dir)
    try:
        started = agree(current_placement(), error, "starting the optimizer save", (socket.gethostname(), uuid.uuid4().hex))
        save_id = started[0][1]
        turn, turns = _turns([host for host, _ in started], dist.get_rank(), per_turn)
        written = {}

        def write():
            if view.writes:
                written["entry"] = _write_file(output_dir, view, save_id)

        failure = _in_turns(turn, turns, write)
        try:
            reports = agree(current_placement(), failure and as_save_error(failure, output_dir),
                            "writing the optimizer state", (record, written.get("entry")))
            committed, commit_error = None, None
            if dist.get_rank() == 0:
                try:
                    committed = _commit(output_dir, save_id, reports, view)
                except Exception as caught:
                    commit_error = as_save_error(caught, output_dir)
            agree(current_placement(), commit_error, "writing the optimizer checkpoint's manifest")
        except BaseException:
            name = os.path.join(output_dir, file_name(view.tp_rank, view.dp_rank, save_id))
            for path in (name, name + ".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise
        if committed is not None:
            _remove_stale(output_dir, committed)
        dist.barrier()  # every rank returns once the old files are gone and the lock is about to be released
    finally:
        if lock is not None:
            folder_lock.release(output_dir, LOCK_NAME, lock)


def _lock_folder(output_dir: str) -> int:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointArgumentError(f"output_dir {output_dir!r} is a file; pass a folder (it is created if missing).")
    os.makedirs(output_dir, exist_ok=True)
    try:
        return folder_lock.acquire(output_dir, LOCK_NAME)
    except folder_lock.FolderBusy as busy:
        raise CheckpointBusyError(
            f"{busy} is saving an optimizer checkpoint to {output_dir!r} right now; wait for it, or save elsewhere."
        ) from None


def _write_file(output_dir: str, view: _View, save_id: str) -> dict:
    """Write this rank's file aside, fsync, rename into place; return its manifest entry."""
    tensors, entries = {}, []
    for index, values in enumerate(view.state()):
        described = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                if fmt.dtype_name(value.dtype) not in fmt.SAFETENSORS_DTYPES or value.layout != torch.strided:
                    raise UnsafeCheckpointError(
                        f"optimizer state {key!r} of parameter {index} is a {value.layout} tensor of {value.dtype}, "
                        f"which safetensors cannot hold (dense tensors of {sorted(fmt.SAFETENSORS_DTYPES)})."
                    )
                tensors[_state_name(index, key)] = value
                described[key] = {"kind": ELEMENTWISE if value.dim() else SCALAR, "dtype": fmt.dtype_name(value.dtype)}
            else:
                described[key] = {"kind": VALUE, "value": value}
        entries.append(described)
    for index, master in enumerate(view.masters() or []):
        tensors[_master_name(index)] = master
    name = file_name(view.tp_rank, view.dp_rank, save_id)
    final = os.path.join(output_dir, name)
    crc, size, _ = write_aside(final, lambda aside: write_safetensors(aside, _storable(tensors), {"format": "pt"}))
    publish(final + ".tmp", final)
    return {"path": name, "bytes": size, "crc32": crc, "tp_rank": view.tp_rank, "dp_rank": view.dp_rank,
            "ranges": [list(r) for r in view.ranges()], "state": entries, "masters": view.master_dtype()}


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, no two sharing storage (what safetensors writes)."""
    storable, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer and pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        storable[name] = tensor
    return storable


def _commit(output_dir: str, save_id: str, reports: list, view: _View) -> dict:
    """Check that the ranks saved one model consistently, write the manifest; return it."""
    first = reports[0][0]
    for rank, (record, _) in enumerate(reports):
        if (record["params"], record["groups"]) != (first["params"], first["groups"]):
            raise CheckpointSaveError(
                f"rank {rank} holds other parameters (shapes, dtypes or TP attributes) than rank 0; every rank must "
                "save the optimizer of the same model, built the same way."
            )
    files = sorted((entry for _, entry in reports if entry is not None), key=lambda e: (e["tp_rank"], e["dp_rank"]))
    state = []
    for tp_rank in range(view.tp_size):
        mine = [entry for entry in files if entry["tp_rank"] == tp_rank]
        if any(entry["state"] != mine[0]["state"] for entry in mine):
            raise CheckpointSaveError(
                f"the DP ranks of TP rank {tp_rank} hold different optimizer state entries (keys, dtypes or values); "
                "they must step the same parameters."
            )
        state.append(mine[0]["state"])
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "checksum": fmt.CHECKSUM, "save_id": save_id,
        "optimizer": type(view.optimizer).__name__, "tensor_parallel_size": view.tp_size,
        "data_parallel_size": view.dp_size, "masters": files[0]["masters"],
        "param_groups": [{"params": size, "hyperparameters": h} for size, h in zip(first["groups"], first["hyperparameters"])],
        "params": [{**p, "global_shape": _global_shape(p, view.tp_size)} for p in first["params"]],
        "state": state,
        "files": [{key: entry[key] for key in ("path", "bytes", "crc32", "tp_rank", "dp_rank", "ranges")} for entry in files],
    }
    final = os.path.join(output_dir, MANIFEST_NAME)
    replace_with_text(final, json.dumps(manifest, indent=1, allow_nan=True), f"{final}.{save_id}.tmp")
    return manifest


def _global_shape(param: dict, tp_size: int) -> list[int]:
    shape = list(param["shape"])
    if param["tensor_model_parallel"]:
        shape[param["partition_dim"]] *= tp_size
    return shape


def _remove_stale(output_dir: str, manifest: dict) -> None:
    """Delete the optimizer files the manifest does not reference (earlier, failed or killed saves)."""
    referenced = {entry["path"] for entry in manifest["files"]}
    for name in os.listdir(output_dir):
        if (_FILE.match(name) and name not in referenced) or _MANIFEST_ASIDE.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, name))


# ---------------------------------------------------------------- load


def load_optimizer_state(optimizer, input_dir: str, num_workers_per_step: int = 8) -> None:
    """Load a checkpoint of `save_optimizer_state` into `optimizer` (ZeRO-1 at any DP size, or a plain optimizer).

    Every rank calls it. The checkpoint must hold the optimizer of the same model (the
    same parameter groups, TP-local shapes and TP attributes; CheckpointShapeError
    otherwise; dtypes may differ: the state is cast as torch's `load_state_dict` casts it) saved at
    the current TP degree (ReshardError otherwise); damaged files raise
    CheckpointCorruptError, a folder without a complete checkpoint
    CheckpointNotFoundError or IncompleteCheckpointError. On any error, every rank
    raises and no optimizer changes. Master weights in the checkpoint are loaded into
    ZeRO-1 masters that are copies; into a plain optimizer (and into masters that are
    the parameters themselves) the model's own checkpoint brings the parameters.
    Ranks of a host read `num_workers_per_step` at a time.
    """
    view, error = None, None
    input_dir = os.fspath(input_dir)
    try:
        per_turn = _checked_workers(num_workers_per_step)
        view = _view(optimizer)
    except Exception as caught:  # reported to every rank below
        error = as_read_error(caught, input_dir)
    hosts = agree(current_placement(), error, "starting the optimizer load", socket.gethostname())
    turn, turns = _turns(hosts, dist.get_rank(), per_turn)
    prepared = {}

    def read():
        prepared["state"] = _prepare(input_dir, view)

    failure = _in_turns(turn, turns, read)
    agree(current_placement(), failure and as_read_error(failure, input_dir), "loading the optimizer state")
    view.load(*prepared["state"])


@dataclass
class _FileEntry:
    path: str
    bytes: int
    crc32: str
    tp_rank: int
    dp_rank: int
    ranges: list[list[int]]


def _prepare(input_dir: str, view: _View) -> tuple[list[dict], list[torch.Tensor] | None, list[dict]]:
    """(states, masters, hyperparameters) for this rank's ranges, read from a checked checkpoint; nothing applied."""
    manifest = read_manifest(input_dir)
    _check_same_model(manifest, view, input_dir)
    files = sorted((_FileEntry(**entry) for entry in manifest["files"] if entry["tp_rank"] == view.tp_rank),
                   key=lambda entry: entry.dp_rank)
    ranges = view.ranges()
    needed = {0} | {j for j, entry in enumerate(files) for i, (start, stop) in enumerate(ranges)
                    if max(start, entry.ranges[i][0]) < min(stop, entry.ranges[i][1])}
    with contextlib.ExitStack() as stack:
        handles = {}
        for j in sorted(needed):
            fmt.verify_file(input_dir, fmt.FileEntry(files[j].path, files[j].bytes, files[j].crc32))
            path = os.path.join(input_dir, files[j].path)
            try:
                handles[j] = stack.enter_context(safe_open(path, framework="pt"))
            except Exception as unreadable:  # safetensors' own error for a malformed file
                raise _corrupt(path, str(unreadable)) from None
        reader = _Reader(files, handles, input_dir)
        states = []
        for index, ((start, stop), entries) in enumerate(zip(ranges, manifest["state"][view.tp_rank])):
            values = {}
            for key, entry in entries.items():
                name = _state_name(index, key)
                if entry["kind"] == VALUE:
                    values[key] = entry["value"]
                elif entry["kind"] == SCALAR:
                    values[key] = reader.scalar(name, entry["dtype"])
                else:
                    values[key] = reader.range(name, entry["dtype"], index, start, stop)
            states.append(values)
        masters = None
        if manifest["masters"] is not None:
            masters = [reader.range(_master_name(i), manifest["masters"], i, start, stop) for i, (start, stop) in enumerate(ranges)]
    return states, masters, [group["hyperparameters"] for group in manifest["param_groups"]]


class _Reader:
    """Reads tensors of one TP rank's files (already checked against their checksums), checking dtypes and shapes."""

    def __init__(self, files: list[_FileEntry], handles: dict, input_dir: str):
        self.files, self.handles, self.input_dir = files, handles, input_dir

    def _slice(self, j: int, name: str, dtype: str, shape: list[int]):
        path = os.path.join(self.input_dir, self.files[j].path)
        try:
            tensor = self.handles[j].get_slice(name)
            found = (tensor.get_dtype(), tensor.get_shape())
        except Exception:  # the name is missing from the file
            raise _corrupt(path, f"it holds no tensor {name!r}") from None
        if found != (fmt.SAFETENSORS_DTYPES[dtype][0], shape):
            raise _corrupt(path, f"{name!r} is {found[1]} {found[0]} but the manifest implies {shape} {dtype}")
        return tensor

    def scalar(self, name: str, dtype: str) -> torch.Tensor:
        """A 0-dim tensor, from the DP rank 0 file."""
        self._slice(0, name, dtype, [])
        return self.handles[0].get_tensor(name)

    def range(self, name: str, dtype: str, index: int, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of parameter `index`'s flat `name`, gathered from the files that hold them."""
        pieces = []
        for j, entry in enumerate(self.files):
            begin, end = entry.ranges[index]
            low, high = max(start, begin), min(stop, end)
            if low < high:
                pieces.append(self._slice(j, name, dtype, [end - begin])[low - begin : high - begin])
        if not pieces:
            return torch.empty(0, dtype=getattr(torch, dtype))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _corrupt(path: str, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path} is not a valid file of this optimizer checkpoint ({problem}); restore the checkpoint folder from "
        "a copy or load an earlier checkpoint."
    )


def _check_same_model(manifest: dict, view: _View, input_dir: str) -> None:
    saved_tp = manifest["tensor_parallel_size"]
    if saved_tp != view.tp_size:
        raise ReshardError(
            f"the optimizer checkpoint at {input_dir!r} was saved at tensor-parallel size {saved_tp}, but this job runs "
            f"tensor-parallel size {view.tp_size}; optimizer state loads only at the TP degree it was saved with (any "
            f"data-parallel size): run with tensor_model_parallel_size={saved_tp}, or start the optimizer afresh."
        )
    saved_groups = [group["params"] for group in manifest["param_groups"]]
    if saved_groups != view.group_sizes():
        raise CheckpointShapeError(
            f"the optimizer checkpoint at {input_dir!r} holds parameter groups of {saved_groups} parameters, but this "
            f"optimizer has groups of {view.group_sizes()}: it was saved for another model (or other groups); load "
            "the checkpoint of this model."
        )
    for index, (saved, current) in enumerate(zip(manifest["params"], view.describe())):
        keys = ("shape", "tensor_model_parallel", "partition_dim", "partition_stride")
        if any(saved[key] != current[key] for key in keys):
            raise CheckpointShapeError(
                f"parameter {index} of the optimizer checkpoint at {input_dir!r} is {_shown(saved)}, but this "
                f"optimizer's is {_shown(current)}: the checkpoint was saved for another model; load the checkpoint "
                "of this model."
            )


def _shown(param: dict) -> str:
    layout = f"sharded along dim {param['partition_dim']}" if param["tensor_model_parallel"] else "replicated"
    return f"{tuple(param['shape'])} ({layout})"


def read_manifest(input_dir: str) -> dict:
    """The manifest of the optimizer checkpoint at `input_dir`, checked field by field (CheckpointCorruptError)."""
    path = os.path.join(input_dir, MANIFEST_NAME)
    if not os.path.isdir(input_dir):
        raise CheckpointNotFoundError(f"no optimizer checkpoint folder at {input_dir!r}; pass the folder that the save wrote.")
    if not os.path.lexists(path):
        if any(_FILE.match(name) for name in os.listdir(input_dir)):
            raise IncompleteCheckpointError(
                f"{input_dir!r} has optimizer files but no {MANIFEST_NAME}: the save that wrote them did not finish, "
                "so it is not a checkpoint; load an earlier checkpoint or save again."
            )
        raise CheckpointNotFoundError(f"no {MANIFEST_NAME} in {input_dir!r}: no optimizer checkpoint was saved there.")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointCorruptError(f"{path} is not a regular file; restore the checkpoint folder from a copy.")
    with open(path, "rb") as file:
        text = file.read()
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise CheckpointCorruptError(f"{path} is not valid JSON ({error}); the checkpoint is damaged.") from None
    _check_manifest(raw, path)
    return raw


def _check_manifest(raw, path: str) -> None:
    """Raise CheckpointCorruptError naming the first field of `raw` that a checkpoint of ours cannot have."""

    def require(condition: bool, where: str, problem: str = "is malformed") -> None:
        if not condition:
            raise CheckpointCorruptError(
                f"{path}: field {where} {problem}; the manifest is damaged or was edited by hand: restore the "
                "checkpoint folder from a copy, or load an earlier checkpoint."
            )

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    require(isinstance(raw, dict), "(top level)", "is not an object")
    require(raw.get("format") == FORMAT_NAME, "format", f"is not {FORMAT_NAME!r}")
    require(raw.get("version") == FORMAT_VERSION, "version", f"is not {FORMAT_VERSION} (saved by another version?)")
    require(raw.get("checksum") == fmt.CHECKSUM, "checksum")
    save_id = raw.get("save_id")
    require(isinstance(save_id, str) and re.fullmatch(r"[0-9a-f]{1,64}", save_id) is not None, "save_id")
    tp, dp = raw.get("tensor_parallel_size"), raw.get("data_parallel_size")
    require(count(tp) and tp >= 1, "tensor_parallel_size")
    require(count(dp) and dp >= 1, "data_parallel_size")
    dtypes = fmt.SAFETENSORS_DTYPES
    require(raw.get("masters") is None or raw.get("masters") in dtypes, "masters")
    groups = raw.get("param_groups")
    require(isinstance(groups, list), "param_groups")
    for g, group in enumerate(groups):
        require(isinstance(group, dict) and count(group.get("params")) and isinstance(group.get("hyperparameters"), dict),
                f"param_groups[{g}]")
    params = raw.get("params")
    require(isinstance(params, list) and len(params) == sum(group["params"] for group in groups), "params",
            "does not list one entry per parameter of the groups")
    for i, param in enumerate(params):
        where = f"params[{i}]"
        require(isinstance(param, dict), where)
        shape = param.get("shape")
        require(isinstance(shape, list) and all(count(size) for size in shape), f"{where}.shape")
        require(param.get("dtype") in dtypes, f"{where}.dtype")
        require(isinstance(param.get("tensor_model_parallel"), bool), f"{where}.tensor_model_parallel")
        dim = param.get("partition_dim")
        require(dim is None or (count(dim) and dim < len(shape)), f"{where}.partition_dim")
        require(not param["tensor_model_parallel"] or dim is not None, f"{where}.partition_dim", "is missing")
        require(count(param.get("partition_stride")) and param["partition_stride"] >= 1, f"{where}.partition_stride")
    state = raw.get("state")
    require(isinstance(state, list) and len(state) == tp, "state", "does not hold one list per TP rank")
    for t, per_param in enumerate(state):
        require(isinstance(per_param, list) and len(per_param) == len(params), f"state[{t}]")
        for i, entries in enumerate(per_param):
            require(isinstance(entries, dict), f"state[{t}][{i}]")
            for key, entry in entries.items():
                where = f"state[{t}][{i}][{key!r:.60}]"
                require(isinstance(entry, dict) and entry.get("kind") in (ELEMENTWISE, SCALAR, VALUE), where)
                require(entry["kind"] == VALUE or entry.get("dtype") in dtypes, f"{where}.dtype")
    files = raw.get("files")
    require(isinstance(files, list) and len(files) == tp * dp, "files", f"does not list {tp} x {dp} files")
    fields = {"path", "bytes", "crc32", "tp_rank", "dp_rank", "ranges"}
    for f, entry in enumerate(files):
        where = f"files[{f}]"
        require(isinstance(entry, dict) and set(entry) == fields, where)
        require(count(entry["tp_rank"]) and entry["tp_rank"] < tp, f"{where}.tp_rank")
        require(count(entry["dp_rank"]) and entry["dp_rank"] < dp, f"{where}.dp_rank")
        require(entry["path"] == file_name(entry["tp_rank"], entry["dp_rank"], save_id), f"{where}.path",
                "is not the name this save gives the file")
        require(count(entry["bytes"]), f"{where}.bytes")
        require(isinstance(entry["crc32"], str) and re.fullmatch(r"[0-9a-f]{8}", entry["crc32"]) is not None, f"{where}.crc32")
        ranges = entry["ranges"]
        require(isinstance(ranges, list) and len(ranges) == len(params) and all(
            isinstance(r, list) and len(r) == 2 and count(r[0]) and count(r[1]) and r[0] <= r[1] for r in ranges),
            f"{where}.ranges")
    require(len({(e["tp_rank"], e["dp_rank"]) for e in files}) == len(files), "files", "lists a rank twice")
    for t in range(tp):
        mine = sorted((e for e in files if e["tp_rank"] == t), key=lambda e: e["dp_rank"])
        for i, param in enumerate(params):
            ends = [0] + [e["ranges"][i][1] for e in mine]
            starts = [e["ranges"][i][0] for e in mine]
            tiled = all(start == end for start, end in zip(starts, ends)) and ends[-1] == math.prod(param["shape"])
            require(tiled, f"files[*].ranges[{i}] of TP rank {t}", "do not cover the parameter exactly once")

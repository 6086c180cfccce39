"""Checkpoints that upstream NeuronxDistributed wrote, read as a sharded source at any TP degree.

Upstream writes one `torch.save` file per TP rank (pipeline and expert rank 0 only
are read here; XX is the TP rank):

    torch                   save_dir/tp_rank_XX_pp_rank_00/checkpoint.pt      parallel_layers.save
    xser                    save_dir/tp_rank_XX_pp_rank_00                    parallel_layers.save(save_xser=True):
                            save_dir/tp_rank_XX_pp_rank_00.tensors/tensor_N.pt  references + one file per tensor
    trainer (torch or xser) tag/model/dp_rank_00_tp_rank_XX_pp_rank_00.pt[.tensors/]  trainer.save_checkpoint
    legacy                  save_dir/tp_rank_XX                                parallel_layers.save of NxD 0.x

The `_dp_rank_ZZ` variants (`master_dp_only=False`) are read from DP rank 00's
files. A trainer tag folder (holding `model/`) is complete only with its `done`
marker. Every file is opened with `torch.load(weights_only=True)`: nothing is
unpickled but tensors and plain containers (plus the xser reference, read as a
number), so a file that pickles anything else raises UnsafeCheckpointError.

Upstream files record no sharding. `UpstreamSource` takes it from `layouts` (model
state-dict key -> `layouts.Layout`), which `layouts.model_layouts` reads off the
target model's layers and `hf_config_layouts` builds from a Hugging Face config's
tensor-parallel plan (for `nxd checkpoint convert`): a model tensor declared sharded
is a shard of a tensor whose partition dim is the rank's size times the saved TP
degree; the model's other tensors are replicated and come from TP rank 0's file, so
every rank loads the same (`convert` checks that the rank files agree); everything
beside the model is per rank (each rank reads its own file, so it loads only at the
saved TP degree).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import asdict, replace

import torch
from tqdm import tqdm

from .. import folder_lock
from ..errors import (
    CheckpointArgumentError,
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    CheckpointShapeError,
    IncompleteCheckpointError,
    ReplicatedMismatchError,
    ReshardError,
    UnsupportedParallelismError,
)
from . import checkpoint_format as fmt
from .checkpoint_plan import RankReport, SavePlan, build_plan, fingerprint
from .layouts import Layout
from .model_state import find_model_state
from .resharding import logical_parts, logical_size
from .sharded_source import ShardedSource
from .state_tree import TensorRef, flatten
from .unsharded import load_torch_file

TORCH, XSER = "torch", "xser"
XSER_REFERENCE = "torch_xla.utils.serialization.TensorReference"
_RANKED = re.compile(
    r"^(?:dp_rank_(?P<dp>\d+)_)?(?:ep_rank_(?P<ep>\d+)_)?tp_rank_(?P<tp>\d+)(?:_pp_rank_(?P<pp>\d+))?"
    r"(?:_dp_rank_(?P<dp_suffix>\d+))?(?P<pt>\.pt)?$"
)


class _XserReference:
    """A `torch_xla.utils.serialization.TensorReference` read back: only its tensor id."""

    __slots__ = ("tid",)

    def __setstate__(self, state) -> None:
        tid = state.get("tid") if isinstance(state, dict) else None
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
            raise CheckpointCorruptError(f"an xser tensor reference holds {state!r:.80} instead of a tensor id.")
        self.tid = tid


def _rank_files(load_dir: str) -> tuple[str, dict[int, str]]:
    """(layout, TP rank -> path) of the upstream checkpoint in `load_dir`; empty when it holds none."""
    torch_files, xser_files, dropped = {}, {}, set()
    for name in sorted(os.listdir(load_dir)):
        match = _RANKED.match(name)
        if not match:
            continue
        path = os.path.join(load_dir, name)
        ranks = {key: int(value) for key, value in match.groupdict().items() if key not in ("tp", "pt") and value}
        if any(ranks.values()):
            dropped.update(f"{key} {value}" for key, value in ranks.items() if value and key in ("pp", "ep"))
            continue
        tp, folder_file = int(match["tp"]), os.path.join(path, "checkpoint.pt")
        if os.path.isdir(path) and os.path.isfile(folder_file) and not match["pt"]:
            torch_files[tp] = folder_file
        elif os.path.isfile(path) and os.path.isdir(path + ".tensors"):
            xser_files[tp] = path
        elif os.path.isfile(path) and (match["pt"] or match["pp"] is None):
            torch_files[tp] = path
    if dropped and (torch_files or xser_files):
        raise UnsupportedParallelismError(
            f"{load_dir!r} holds files of other pipeline or expert ranks ({', '.join(sorted(dropped))}); only "
            "tensor parallelism is supported here: save the checkpoint with pipeline and expert parallel size 1."
        )
    if torch_files and xser_files:
        raise CheckpointCorruptError(
            f"{load_dir!r} holds both torch.save rank files {sorted(torch_files)} and xser rank files "
            f"{sorted(xser_files)}; keep the files of one save only."
        )
    return (XSER, xser_files) if xser_files else (TORCH, torch_files)


def find_upstream_folder(load_dir: str) -> str | None:
    """The folder holding the rank files of an upstream checkpoint at `load_dir` (itself or a trainer tag's
    `model/`), or None when there is none. A trainer tag without its `done` marker raises IncompleteCheckpointError."""
    if not os.path.isdir(load_dir) or os.path.exists(os.path.join(load_dir, fmt.MANIFEST_NAME)):
        return None
    in_tag = os.path.basename(os.path.abspath(load_dir)) == "model"
    for folder, tag in ((load_dir, os.path.dirname(os.path.abspath(load_dir)) if in_tag else None),
                        (os.path.join(load_dir, "model"), load_dir)):
        if os.path.isdir(folder) and _rank_files(folder)[1]:
            if tag and os.path.isfile(os.path.join(tag, "checkpoint")) and not os.path.exists(os.path.join(tag, "done")):
                raise IncompleteCheckpointError(
                    f"{tag!r} is a trainer checkpoint without its 'done' marker: its save did not finish; "
                    "load an earlier checkpoint tag."
                )
            return folder
    return None


def _load_file(path: str):
    """`path` loaded weights-only, an xser reference allowed (as `_XserReference`)."""
    with torch.serialization.safe_globals([(_XserReference, XSER_REFERENCE)]):
        return load_torch_file(path)


def _resolve_xser(tree, tensors_dir: str):
    """`tree` with each xser reference replaced by its tensor file (memory-mapped)."""
    if isinstance(tree, _XserReference):
        path = os.path.join(tensors_dir, f"tensor_{tree.tid}.pt")
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"{path!r}, which the xser checkpoint references, is missing; copy the whole folder.")
        tensor = _load_file(path)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointCorruptError(f"{path!r} holds a {type(tensor).__name__}, not the tensor it should; the checkpoint is damaged.")
        return tensor
    if isinstance(tree, dict):
        return {key: _resolve_xser(value, tensors_dir) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_resolve_xser(value, tensors_dir) for value in tree)
    return tree


def _named(tree) -> tuple[object, dict[str, torch.Tensor]]:
    """`tree` with each tensor replaced by a `TensorRef` named by its key path, and name -> tensor."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            name = "/".join(map(str, path)) or "tensor"
            tensors[name] = value
            return TensorRef(name)
        if isinstance(value, dict):
            return {key: walk(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
            return type(value)(walk(item, (*path, index)) for index, item in enumerate(value))
        return value

    return walk(tree, ()), tensors


class UpstreamCheckpoint:
    """The rank files of an upstream checkpoint folder, each loaded once, when first needed."""

    def __init__(self, load_dir: str, load_xser: bool | None = None):
        folder = find_upstream_folder(load_dir)
        if folder is None:
            raise CheckpointNotFoundError(
                f"{load_dir!r} holds no upstream NeuronxDistributed checkpoint (tp_rank_XX_pp_rank_YY/checkpoint.pt, "
                "tp_rank_XX_pp_rank_YY with its .tensors folder, or a trainer tag's model/ folder); pass the folder "
                "that upstream's save wrote."
            )
        self.layout, self.paths = _rank_files(folder)
        if load_xser is not None and load_xser != (self.layout == XSER):
            raise CheckpointNotFoundError(
                f"load_xser={load_xser} but {load_dir!r} holds the {self.layout} layout; pass load_xser="
                f"{self.layout == XSER} (or leave it out: the layout is detected)."
            )
        missing = sorted(set(range(max(self.paths) + 1)) - set(self.paths))
        if missing:
            raise CheckpointNotFoundError(f"{folder!r} lacks the files of TP ranks {missing}; copy the whole checkpoint folder.")
        self.load_dir, self.tensor_parallel_size = load_dir, len(self.paths)
        self._states: dict[int, object] = {}
        self._trees: dict[int, tuple[object, dict[str, torch.Tensor]]] = {}

    def state(self, tp_rank: int):
        """TP rank `tp_rank`'s saved state, loaded weights-only, its tensors memory-mapped."""
        if tp_rank not in self._states:
            path = self.paths[tp_rank]
            state = _load_file(path)
            self._states[tp_rank] = _resolve_xser(state, path + ".tensors") if self.layout == XSER else state
        return self._states[tp_rank]

    def rank(self, tp_rank: int) -> tuple[object, dict[str, torch.Tensor]]:
        """(TP rank `tp_rank`'s state with `TensorRef`s named by key path, name -> tensor)."""
        if tp_rank not in self._trees:
            self._trees[tp_rank] = _named(self.state(tp_rank))
        return self._trees[tp_rank]


def model_shapes(checkpoint: UpstreamCheckpoint, model_key: str | None) -> dict[str, list[int]]:
    """Key -> shape (TP rank 0's shard) of the model's state dict in TP rank 0's file."""
    tree, tensors = checkpoint.rank(0)
    model = find_model_state(tree, model_key, TensorRef)
    if not model:
        keys = sorted(map(str, tree))[:20] if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointKeyError(
            f"no model state dict under model_key {model_key!r} in {checkpoint.load_dir!r} (top-level keys: {keys}); "
            "pass the key it is saved under (--model-key, '' for a bare state dict)."
        )
    return {key: list(tensors[ref.name].shape) for key, ref in model.items() if isinstance(ref, TensorRef)}


def _sharded_entry(name: str, tensor: torch.Tensor, layout: Layout, world: int) -> fmt.TensorEntry:
    dim, stride, parts = layout.partition_dim, layout.stride, layout.parts
    shape = list(tensor.shape)
    if dim >= len(shape):
        raise CheckpointCorruptError(f"'{name}' has shape {tuple(shape)} but the model shards it along dim {dim}; "
                                     "load the checkpoint into the model it was saved from.")
    shape[dim] *= world
    dtype = fmt.dtype_name(tensor.dtype)
    if parts is None:
        return fmt.TensorEntry(shape, dtype, fmt.SHARDED, dim, stride)
    if shape[dim] == sum(part.size for part in parts):
        saved = tuple(parts)
    elif shape[dim] == logical_size(parts):
        saved = logical_parts(parts)
    else:
        raise ReshardError(
            f"'{name}' holds {shape[dim]} rows along dim {dim} over the {world} saved TP ranks, which matches neither "
            f"the model's parts {[part.size for part in parts]} nor each replicated block once ({logical_size(parts)}); "
            "load it at the TP degree and kv_size_multiplier it was saved with."
        )
    return fmt.TensorEntry(shape, dtype, fmt.SHARDED, dim, 1, [asdict(part) for part in saved])


class UpstreamSource(ShardedSource):
    """What TP rank `rank` of `world_size` loads from an upstream checkpoint, sharded as `layouts` say.

    It reads like `ShardedSource` (the same resharding), from the upstream rank files
    instead of ours; `tree` is this rank's state with `TensorRef`s. The source has
    no checksums to verify.
    """

    def __init__(self, checkpoint: UpstreamCheckpoint, model_key: str | None, layouts: dict[str, Layout],
                 rank: int, world_size: int):
        # ShardedSource.__init__ reads our manifest and shard files; this source sets the same attributes itself.
        self.checkpoint, self.load_dir = checkpoint, checkpoint.load_dir
        self.rank, self.world_size = rank, world_size
        self.source_world = checkpoint.tensor_parallel_size
        self.source_rank = rank if rank < self.source_world else 0
        first, first_tensors = checkpoint.rank(0)
        model_tree = find_model_state(first, model_key, TensorRef) or {}
        model_names = {ref.name: key for key, ref in model_tree.items() if isinstance(ref, TensorRef)}
        entries = {}
        for name, tensor in first_tensors.items():
            shape, dtype = list(tensor.shape), fmt.dtype_name(tensor.dtype)
            layout = layouts.get(model_names[name], Layout(None)) if name in model_names else None
            if layout is not None and layout.sharded:
                entries[name] = _sharded_entry(name, tensor, layout, self.source_world)
            elif layout is not None or self.source_world == 1:
                entries[name] = fmt.TensorEntry(shape, dtype, fmt.REPLICATED)
            else:
                entries[name] = fmt.TensorEntry(shape, dtype, fmt.LOCAL)
        files = [fmt.FileEntry(path, 0, "") for _, path in sorted(checkpoint.paths.items())]
        self.manifest = fmt.Manifest(self.source_world, "upstream", model_key, files, entries)
        self._checked = {}
        self.tree = checkpoint.rank(self.source_rank)[0]

    def check_file(self, source_rank: int):
        """Saved TP rank `source_rank`'s file, its sharded tensors checked to have rank 0's shapes and dtypes."""
        if source_rank not in self._checked:
            tensors = self.checkpoint.rank(source_rank)[1]
            for name, entry in self.manifest.tensors.items():
                if entry.layout != fmt.SHARDED or name not in tensors:
                    continue
                shard = tensors[name]
                expected = list(self.checkpoint.rank(0)[1][name].shape)
                if list(shard.shape) != expected or fmt.dtype_name(shard.dtype) != entry.dtype:
                    raise CheckpointCorruptError(
                        f"'{name}' is a {tuple(expected)} {entry.dtype} shard in TP rank 0's file but a "
                        f"{tuple(shard.shape)} {fmt.dtype_name(shard.dtype)} one in TP rank {source_rank}'s; the rank "
                        "files do not belong to one checkpoint."
                    )
            self._checked[source_rank] = _RankFile(self.checkpoint.paths[source_rank], frozenset(tensors))
        return self._checked[source_rank]

    def check_loadable(self, names, targets=None) -> None:
        for name in names:
            if self.manifest.tensors[name].layout == fmt.LOCAL and self.world_size != self.source_world:
                raise ReshardError(
                    f"'{name}' is not part of the model, so its sharding is unknown (upstream files record none); it "
                    f"loads only at the saved TP degree {self.source_world}. Load the model alone at TP={self.world_size} "
                    "(a checkpoint holding only the model, or model_key pointing at it)."
                )
        super().check_loadable(names, targets)

    def _read_piece(self, source: int, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop along `dim` (all when None) of saved TP rank `source`'s tensor `name` (TP rank 0's
        for the model's replicated tensors, so that every rank loads the same): a view of the mapped file."""
        if self.manifest.tensors[name].layout == fmt.REPLICATED:
            source = 0
        tensor = self.checkpoint.rank(source)[1][name]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)


class _RankFile:
    """What `ShardedSource.check_loadable` asks of a checked rank file: its path and tensor names."""

    def __init__(self, path: str, names: frozenset[str]):
        self.path, self.names = path, names


def hf_config_layouts(config_path: str, tensor_parallel_size: int, shapes: dict[str, list[int]]) -> dict[str, Layout]:
    """State-dict key -> layout of the Hugging Face model that `config_path` (a config.json or its folder)
    describes, sharded over `tensor_parallel_size` ranks as `parallelize` shards it (built on the meta device).

    The model class is the config's architecture, else a causal LM, else the base model: the first whose
    state-dict keys are those of `shapes` (the checkpoint's keys and TP rank 0's shapes), which must then be
    the shards of the model's tensors."""
    import transformers

    from ..tp_plan import STYLES, model_plan
    from ..tp_plan.checks import Swap, attention_updates, parameter_layouts
    from ..tp_plan.plans import planned_modules

    try:
        config = transformers.AutoConfig.from_pretrained(config_path)
    except (OSError, ValueError) as error:
        raise CheckpointArgumentError(
            f"--config {config_path!r} is not a Hugging Face config ({str(error).splitlines()[0]}); pass config.json "
            "or the model folder holding it."
        ) from None
    keys, tried = set(shapes), {}
    architecture = next(iter(getattr(config, "architectures", None) or ()), None)
    builders = [getattr(transformers, architecture, None) if architecture else None,
                transformers.AutoModelForCausalLM.from_config, transformers.AutoModel.from_config]
    for build in filter(None, builders):
        try:
            with torch.device("meta"):
                model = build(config)
        except ValueError:  # no causal LM for this config
            continue
        tried[type(model).__name__] = set(model.state_dict()) ^ keys
        if not tried[type(model).__name__]:
            break
    else:
        differences = {name: sorted(difference)[:4] for name, difference in tried.items()}
        raise CheckpointKeyError(
            f"no model that --config {config_path!r} describes has the checkpoint's keys (keys that differ: "
            f"{differences}); pass the config of the model that saved it (or --model-key if its state dict is elsewhere)."
        )
    swaps = {}
    for name, (entry, style_name) in planned_modules(model, model_plan(model), False).items():
        swap = Swap(name, entry, style_name, STYLES[style_name], model.get_submodule(name))
        if swap.style.kind != "replicate":
            swap.layouts = parameter_layouts(swap, tensor_parallel_size)
        swaps[name] = swap
    attention_updates(swaps, model, tensor_parallel_size)
    replicated_kv = sorted(name for name, swap in swaps.items() if swap.kv_multiplier > 1)
    if replicated_kv:
        raise ReshardError(
            f"at TP={tensor_parallel_size} the key/value projections {replicated_kv[:4]} hold replicated heads, whose "
            "layout in upstream files is not known here; convert a checkpoint saved at a TP degree that divides the "
            "key/value head count."
        )
    declared = {}
    for swap in swaps.values():
        for param_name, layout in swap.layouts.items():
            param = getattr(swap.module, param_name, None)
            if param is not None:
                declared[id(param)] = Layout(*layout) if layout is not None else Layout(None)
    layouts = {key: declared.get(id(param), Layout(None)) for key, param in model.state_dict(keep_vars=True).items()}
    for key, param in model.state_dict().items():
        full = list(shapes[key])
        if layouts[key].sharded and layouts[key].partition_dim < len(full):
            full[layouts[key].partition_dim] *= tensor_parallel_size
        if full != list(param.shape):
            raise CheckpointShapeError(
                f"'{key}' is {tuple(shapes[key])} on TP rank 0, which makes {tuple(full)} over the {tensor_parallel_size} "
                f"ranks, but the model of --config {config_path!r} has {tuple(param.shape)}; pass the config of the "
                "model that saved the checkpoint."
            )
    return layouts


def _check_rank_files(flats: list, entries: dict[str, fmt.TensorEntry], model_names: set[str]) -> None:
    """CheckpointCorruptError unless every rank file holds the model's tensors and only tensors of TP rank 0's."""
    for rank, flat in enumerate(flats):
        unknown, missing = sorted(set(flat.tensors) - set(entries)), sorted(model_names - set(flat.tensors))
        if unknown:
            raise CheckpointCorruptError(
                f"TP rank {rank}'s file holds {unknown[:5]}, which TP rank 0's lacks; the rank files do not belong "
                "to one checkpoint."
            )
        if missing:
            raise CheckpointCorruptError(
                f"TP rank {rank}'s file lacks the model's {missing[:5]}, which TP rank 0's holds; the rank files do "
                "not belong to one checkpoint."
            )


def _replicated_fingerprints(checkpoint: UpstreamCheckpoint, names: list[str]) -> list[dict[str, str]]:
    """Per rank file, name -> crc32 of each of the model's replicated tensors `names`; ReplicatedMismatchError
    unless they are the same in every rank file."""
    fingerprints = []
    for rank in range(checkpoint.tensor_parallel_size):
        tensors = checkpoint.rank(rank)[1]
        fingerprints.append({name: fingerprint(tensors[name]) for name in names})
        for name, crc in fingerprints[rank].items():
            if crc != fingerprints[0][name]:
                raise ReplicatedMismatchError(
                    f"model tensor '{name}' is replicated in the model's layout but TP rank {rank}'s file holds another "
                    "value than TP rank 0's: the layout given (--config) is not the one the checkpoint was saved with."
                )
    return fingerprints


def _plan(flats: list, entries: dict[str, fmt.TensorEntry], model_names: set[str],
          fingerprints: list[dict[str, str]]) -> SavePlan:
    """The save plan of the rank files' tensors (`flats`, one per TP rank), as `parallel_layers.save` plans
    them: `entries` (the whole tensors) give each rank's shard; the model's replicated tensors (crc32s in
    `fingerprints`, the same in every file) are written once, by TP rank 0; everything else by each rank."""
    world = len(flats)

    def local(entry: fmt.TensorEntry) -> fmt.TensorEntry:
        if entry.layout != fmt.SHARDED:
            return entry
        shape = list(entry.shape)
        shape[entry.partition_dim] //= world
        return replace(entry, shape=shape)

    return build_plan([RankReport(rank, {name: local(entries[name]) for name in flat.tensors}, fingerprints[rank],
                                  frozenset(model_names)) for rank, flat in enumerate(flats)])


def convert(load_dir: str, out_dir: str, layouts: dict[str, Layout], model_key: str | None = "model",
            progress: bool = False) -> fmt.Manifest:
    """Write the upstream checkpoint at `load_dir` to `out_dir` as a checkpoint of `parallel_layers.save`, at its
    TP degree, the model's tensors sharded as `layouts` say; return its manifest.

    Every argument and file is checked before anything is written (the model's
    replicated tensors must agree across the rank files), and the files follow the
    plan of `parallel_layers.save` (`checkpoint_plan`): the model's replicated tensors
    are written once, into TP rank 0's file. The manifest is written last, so a
    checkpoint already in `out_dir` stays the one that loads until the new one is
    complete, and a failed run removes the files it wrote.
    """
    from .checkpoint_tools import check_output_folder

    check_output_folder(load_dir, out_dir, "checkpoint")
    checkpoint = UpstreamCheckpoint(load_dir)
    world = checkpoint.tensor_parallel_size
    sources = [UpstreamSource(checkpoint, model_key, layouts, rank, world) for rank in range(world)]
    for source in sources:
        source.check_loadable(list(checkpoint.rank(source.rank)[1]))
    entries = sources[0].manifest.tensors
    model_tree = find_model_state(checkpoint.rank(0)[0], model_key, TensorRef) or {}
    model_names = {ref.name for ref in model_tree.values() if isinstance(ref, TensorRef)}
    flats = [flatten(checkpoint.state(rank)) for rank in range(world)]
    _check_rank_files(flats, entries, model_names)
    replicated = sorted(name for name in model_names if entries[name].layout == fmt.REPLICATED and world > 1)
    plan = _plan(flats, entries, model_names, _replicated_fingerprints(checkpoint, replicated))
    first = checkpoint.state(0)
    saved_key = model_key if isinstance(first, dict) and isinstance(first.get(model_key), dict) else None
    save_id, files = uuid.uuid4().hex, []
    os.makedirs(out_dir, exist_ok=True)
    try:
        with folder_lock.locked(out_dir, fmt.SAVE_LOCK_NAME):
            try:
                with tqdm(total=world, unit="rank", desc="convert", disable=not progress) as bar:
                    for rank, flat in enumerate(flats):
                        tensors, storages = {}, set()
                        for name in plan.files[rank]:  # safetensors refuses tensors sharing memory
                            tensor = flat.tensors[name].contiguous()
                            pointer = tensor.untyped_storage().data_ptr()
                            tensors[name] = tensor.clone() if pointer in storages else tensor
                            storages.add(pointer)
                        files.append(fmt.write_shard_file(out_dir, rank, save_id, tensors, flat.structure))
                        bar.update()
                manifest = fmt.Manifest(world, save_id, saved_key, files, plan.tensors)
                fmt.write_manifest(out_dir, manifest)
            except BaseException:
                for rank in range(world):
                    fmt.remove_shard_file(out_dir, rank, save_id)
                raise
            fmt.remove_stale(out_dir, manifest)
    except folder_lock.FolderBusy as busy:
        raise CheckpointBusyError(f"{busy} is writing to {out_dir!r} right now; wait for it, or write elsewhere.") from None
    return manifest

"""Offline operations on a sharded checkpoint, without a process group: verify, merge, reshard.

`merge` writes the model's full tensors as a Hugging Face style folder
(`model.safetensors`, or numbered files and `model.safetensors.index.json`
above `max_shard_bytes`) that `load(..., sharded=False)` and transformers'
`from_pretrained` read. `reshard` writes the whole checkpoint (model, optimizer
and everything else) at another TP degree; `reshard(..., 1)` is the complete
unsharded checkpoint in our format.

Every argument is checked before anything is written (`check_output_folder`,
`check_tensor_parallel_size`): an output folder that holds a checkpoint is
replaced only by a complete new one, and a failed run removes what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from tqdm import tqdm

from .. import folder_lock
from ..durable import fsync_path
from ..errors import (
    CheckpointArgumentError,
    CheckpointBusyError,
    CheckpointCorruptError,
    CheckpointKeyError,
    ReplicatedMismatchError,
    ReshardError,
)
from . import checkpoint_format as fmt
from .checkpoint_storage import drop_cached_pages, start_writeback
from .resharding import logical_parts
from .sharded_source import ShardedSource, Target, check_entry_divisible, read_exactly
from .state_tree import TensorRef, decode

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_BUFFER_BYTES = 8 * 1024**2  # merge reads shard bytes into it and writes it when full
_MERGED_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.tmp)?$|^model\.safetensors\.index\.json(\.tmp)?$")
_CHECKPOINT_ENTRY = re.compile(r"^manifest\.json(\.[0-9a-f]+\.tmp)?$|^tp_rank_\d+$")


def verify(load_dir: str, progress: bool = False) -> fmt.Manifest:
    """Check every shard file against the manifest (header, rank, save, checksum) and the files against
    each other (the same replicated tensors everywhere); return the manifest."""
    manifest = fmt.read_manifest(load_dir)
    with _checksums(load_dir, manifest, progress) as checksums:
        _raise_first(checksums)
    _check_structure(load_dir, manifest)
    return manifest


@contextlib.contextmanager
def _checksums(load_dir: str, manifest: fmt.Manifest, progress: bool):
    """Check the files' checksums in the background (a thread per file, up to one per CPU: crc32 runs outside
    the GIL) during the block; yields their futures (see `_raise_first`)."""
    total = sum(entry.bytes for entry in manifest.files)
    threads = max(1, min(len(manifest.files), os.cpu_count() or 1))
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar, \
            ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(fmt.verify_file, load_dir, entry, bar.update) for entry in manifest.files]
        try:
            yield futures
        finally:
            for future in futures:
                future.cancel()


def _raise_first(checksums) -> None:
    """Wait for the checksums; raise the first file's error (in rank order) if any failed."""
    for future in checksums:
        if not future.cancelled():
            future.result()


def _check_structure(load_dir: str, manifest: fmt.Manifest) -> None:
    """Check every shard file's header against the manifest, and that each sharded tensor is in every file."""
    shard_files = [fmt.check_shard_file(load_dir, manifest, rank) for rank in range(manifest.tensor_parallel_size)]
    for name, entry in manifest.tensors.items():
        holders = [shard.names.__contains__(name) for shard in shard_files]
        if entry.layout == fmt.SHARDED and not all(holders):
            raise CheckpointCorruptError(
                f"'{name}' is sharded over {manifest.tensor_parallel_size} TP ranks but the files of TP ranks "
                f"{[rank for rank, held in enumerate(holders) if not held]} lack it; restore the checkpoint from a copy."
            )


def check_tensor_parallel_size(tensor_parallel_size, manifest: fmt.Manifest) -> None:
    """Raise ReshardError unless the checkpoint can be written at TP degree `tensor_parallel_size` (no files read)."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ReshardError(f"the TP degree must be an integer >= 1, got {tensor_parallel_size!r:.40}; pass e.g. --tp 2.")
    for name, entry in manifest.tensors.items():
        if entry.layout == fmt.LOCAL and tensor_parallel_size != manifest.tensor_parallel_size:
            raise ReshardError(
                f"'{name}' holds a different value on each of the {manifest.tensor_parallel_size} TP ranks that saved it "
                f"and cannot be resharded to TP={tensor_parallel_size}."
            )
        if entry.layout == fmt.SHARDED:
            check_entry_divisible(name, entry, tensor_parallel_size)


def _same_folder(first: str, second: str) -> bool:
    return os.path.exists(second) and os.path.samefile(first, second)


def check_output_folder(load_dir: str, out_dir: str, kind: str) -> None:
    """Raise CheckpointArgumentError unless `out_dir` may receive a `kind` ("checkpoint" or "merge") of `load_dir`.

    It must not be `load_dir` or inside it, nor a file; an existing folder may hold
    only what that kind writes (a checkpoint, or an earlier merge), which a
    finished run replaces.
    """
    if not isinstance(out_dir, str) or not out_dir:
        raise CheckpointArgumentError(f"the output folder must be a non-empty path, got {out_dir!r:.80}.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointArgumentError(f"{out_dir!r} is a file, not a folder; pass a new or empty folder to write to.")
    real_in, real_out = os.path.realpath(load_dir), os.path.realpath(out_dir)
    if _same_folder(load_dir, out_dir) or os.path.commonpath([real_in, real_out]) == real_in:
        raise CheckpointArgumentError(
            f"{out_dir!r} is the checkpoint being read, or inside it; write to another folder (then move it if you like)."
        )
    if not os.path.isdir(out_dir):
        return
    belongs = _MERGED_FILE.match if kind == "merge" else _CHECKPOINT_ENTRY.match
    others = sorted(name for name in os.listdir(out_dir) if not belongs(name) and name != fmt.SAVE_LOCK_NAME)
    if others:
        what = "a merged model" if kind == "merge" else "a checkpoint"
        raise CheckpointArgumentError(
            f"{out_dir!r} holds {others[:5]}{' ...' if len(others) > 5 else ''}, which is not {what}; "
            "write to a new or empty folder (nothing was written)."
        )


def model_tensor_names(load_dir: str, manifest: fmt.Manifest, model_key: str | None) -> dict[str, str]:
    """Model state-dict key -> tensor name, from TP rank 0's structure."""
    tree = decode(fmt.check_shard_file(load_dir, manifest, 0).structure, TensorRef)
    key = model_key if model_key is not None else manifest.model_key
    if isinstance(tree, dict) and key is not None and isinstance(tree.get(key), dict):
        tree = tree[key]
    if not isinstance(tree, dict) or not tree or not all(isinstance(value, TensorRef) for value in tree.values()):
        keys = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointKeyError(
            f"no model state dict under model_key {key!r} in {load_dir!r} (top-level keys: {keys}); "
            "pass --model-key with the key the model was saved under."
        )
    return {key: value.name for key, value in tree.items()}


@contextlib.contextmanager
def _writing(out_dir: str):
    """Create `out_dir` and hold its write lock (the one `save` takes) for the block."""
    os.makedirs(out_dir, exist_ok=True)
    try:
        with folder_lock.locked(out_dir, fmt.SAVE_LOCK_NAME):
            yield
    except folder_lock.FolderBusy as busy:
        raise CheckpointBusyError(f"{busy} is writing to {out_dir!r} right now; wait for it, or write elsewhere.") from None


def _check_replicated_equal(source_files: list[ShardedSource], names) -> None:
    """Raise ReplicatedMismatchError if a model tensor recorded as replicated differs between rank files (one
    written once, in one file, cannot)."""
    first = source_files[0]
    for name in names:
        entry = first.manifest.tensors[name]
        if entry.layout != fmt.REPLICATED or entry.file is not None:
            continue
        reference = first.read(name)
        for other in source_files[1:]:
            if not torch.equal(other.read(name), reference):
                raise ReplicatedMismatchError(
                    f"model tensor '{name}' is recorded as replicated but TP rank {other.rank}'s file holds a "
                    "different value than TP rank 0's: it is a shard saved without its tensor-parallel attributes "
                    "(a copied or cast state dict), so no merged value is right. Save model.state_dict() itself again."
                )


def merge(load_dir: str, out_dir: str, model_key: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          progress: bool = False) -> list[str]:
    """Write the model's unsharded tensors to `out_dir`; return the files written.

    Replicated KV heads (a tensor whose manifest entry records parts with copies) are
    written once each: the model's logical tensor, as the unreplicated layer holds it.

    Each file is written in one pass (`_write_merged`) while the shard files' checksums
    are checked in the background; nothing is published unless every checksum matches.
    Every file is written aside and renamed into place once all are complete, so a
    failed merge leaves an earlier merge in `out_dir` as it was (and no `out_dir` if
    there was none); a finished one replaces it, deleting its files that the new one
    does not have. The earlier merge's cached pages are dropped before writing
    (`drop_cached_pages`), so that the new files reuse that memory. A model tensor
    recorded as replicated must be the same in every rank's file.
    """
    check_output_folder(load_dir, out_dir, "merge")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointArgumentError(f"max_shard_bytes must be an integer >= 1, got {max_shard_bytes!r:.40}; pass e.g. 5GB.")
    if model_key is not None and not isinstance(model_key, str):
        raise CheckpointArgumentError(f"model_key must be a string or None, got {type(model_key).__name__}.")
    manifest = fmt.read_manifest(load_dir)
    created = not os.path.isdir(out_dir)
    with _checksums(load_dir, manifest, progress) as checksums:
        try:
            files = _merge_checked(load_dir, out_dir, manifest, model_key, max_shard_bytes, progress, checksums)
        except Exception:
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(out_dir)  # made by this merge, and left empty
            _raise_first(checksums)  # a damaged file is what to report, whatever else it broke
            raise
    return files


def _merge_checked(load_dir, out_dir, manifest, model_key, max_shard_bytes, progress, checksums) -> list[str]:
    """`merge`'s checks and writes, with the checksums still running in `checksums`."""
    _check_structure(load_dir, manifest)
    names = model_tensor_names(load_dir, manifest, model_key)
    per_rank = [ShardedSource(load_dir, manifest, rank, manifest.tensor_parallel_size)
                for rank in range(manifest.tensor_parallel_size)]
    _check_replicated_equal(per_rank, names.values())
    source = ShardedSource(load_dir, manifest, 0, 1)
    source.check_loadable(names.values())
    groups, size = [[]], 0
    for key, name in names.items():
        entry = manifest.tensors[name]
        nbytes = entry.nbytes
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors" for index in range(len(groups))
    ]
    with _writing(out_dir):
        drop_cached_pages(os.path.join(out_dir, name) for name in os.listdir(out_dir) if _MERGED_FILE.match(name))
        written = []
        try:
            with tqdm(total=len(names), unit="tensor", desc="merge", disable=not progress) as bar:
                for file_name, keys in zip(files, groups):
                    write = partial(_write_merged, source=source, tensors=[(key, names[key]) for key in keys], bar=bar)
                    written.append(_write_aside(os.path.join(out_dir, file_name), write))
            if len(files) > 1:
                index = {
                    "metadata": {"total_size": sum(manifest.tensors[name].nbytes for name in names.values())},
                    "weight_map": {key: file_name for file_name, keys in zip(files, groups) for key in keys},
                }
                files.append("model.safetensors.index.json")
                written.append(_write_aside(os.path.join(out_dir, files[-1]), partial(_write_json, value=index)))
            _raise_first(checksums)
        except BaseException:
            for aside in written:
                os.remove(aside)
            raise
        _publish(out_dir, written)
    return files


def _write_merged(path: str, source: ShardedSource, tensors: list[tuple[str, str]], bar) -> None:
    """Write `tensors` ((state-dict key, checkpoint tensor name) pairs) as the safetensors file `path`, in one
    pass: the header from the manifest, then each logical tensor's bytes, the disk starting on each tensor once it
    is written (`checkpoint_storage.start_writeback`).

    No merged tensor is built in memory: the shard files' bytes are read (`preadv`) straight into their places
    in one reused buffer (`_merged_chunks`), which is written out each time it is full. Tensors are ordered by
    item size (largest first, as safetensors does), so each starts aligned to its item size.
    """
    entries = [(key, name, source.manifest.tensors[name]) for key, name in tensors]
    entries.sort(key=lambda item: -getattr(torch, item[2].dtype).itemsize)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, _, entry in entries:
        dtype = fmt.SAFETENSORS_DTYPES[entry.dtype][0]
        header[key] = {"dtype": dtype, "shape": entry.logical_shape, "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned
    buffer = memoryview(bytearray(_BUFFER_BYTES))
    with open(path, "wb", buffering=0) as file, contextlib.ExitStack() as shard_files:
        opened = {}

        def read(rank: int, views: list[memoryview], offset: int) -> None:
            if rank not in opened:
                opened[rank] = shard_files.enter_context(open(source.check_file(rank).path, "rb", buffering=0))
            read_exactly(opened[rank], views, offset, "merge")

        _write_all(file, struct.pack("<Q", len(text)) + text)
        for _, name, entry in entries:
            begin = file.tell()
            for chunk in _merged_chunks(source, name, entry, read, buffer):
                _write_all(file, chunk)
            start_writeback(file.fileno(), begin, file.tell() - begin)  # the disk writes it while the rest is read
            bar.update()


def _merged_chunks(source: ShardedSource, name: str, entry: fmt.TensorEntry, read, buffer: memoryview):
    """The bytes of the model's whole tensor `name`, in order, as successive filled views of `buffer` (or of a
    larger one, when a single row of the merged tensor does not fit); `read(rank, views, offset)` fills `views`
    in turn from saved TP rank `rank`'s shard file at `offset`.

    Each piece of the merged tensor (`ShardedSource.pieces`) is, in its shard file, `outer` rows (the product of
    the dims before the partition dim; 1 for a whole tensor or partition dim 0) of which each holds the piece's
    `take` bytes after `skip` others. With one row, each piece is one run of the file, read a buffer at a time;
    with more (row-parallel weights), a block of rows at a time, each rank's row going straight to its columns in
    the buffer (and the bytes around it, of rows a piece does not take, to a scratch buffer).
    """
    target = Target(logical_parts(entry.row_parts()), 0, 1) if entry.layout == fmt.SHARDED else None
    dim, pieces = source.pieces(name, target)
    outer, layouts = 1, []  # (saved TP rank, file offset of its tensor, bytes per row, skip, take)
    for rank, start, stop in pieces:
        dtype, shape, offset = source.check_file(rank).spans[name]
        if dim is None:
            layout = (rank, offset, 0, 0, math.prod(shape) * dtype.itemsize)
        else:
            outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:]) * dtype.itemsize
            layout = (rank, offset, shape[dim] * inner, start * inner, (stop - start) * inner)
        layouts.append(layout)
    width = sum(take for *_, take in layouts)
    if outer == 1:
        for rank, offset, _, skip, take in layouts:
            for at in range(0, take, len(buffer)):
                chunk = buffer[:min(len(buffer), take - at)]
                read(rank, [chunk], offset + skip + at)
                yield chunk
        return
    if not width or not outer:
        return
    if len(buffer) < width:
        buffer = memoryview(bytearray(width))
    scratch = memoryview(bytearray(max(max(skip, row - skip - take) for _, _, row, skip, take in layouts)))
    block = min(outer, len(buffer) // width)
    for first in range(0, outer, block):
        count, column = min(block, outer - first), 0
        for rank, offset, row, skip, take in layouts:
            before, after = scratch[:skip], scratch[:row - skip - take]
            views = [view for at in range(column, count * width, width)
                     for view in (before, buffer[at:at + take], after) if len(view)]
            read(rank, views, offset + first * row)
            column += take
        yield buffer[:count * width]


def _write_all(file, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        view = view[file.write(view):]


def _write_json(path: str, value) -> None:
    with open(path, "w") as file:
        json.dump(value, file, indent=2)


def _write_aside(final: str, write) -> str:
    """Call `write(path)` on a temporary path beside `final` and fsync it; return that path."""
    aside = f"{final}.tmp"
    try:
        write(aside)
        fsync_path(aside)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(aside)
        raise
    return aside


def _publish(out_dir: str, written_aside: list[str]) -> None:
    """Rename the finished files into place, then delete the files of an earlier merge that they replace."""
    finals = [path.removesuffix(".tmp") for path in written_aside]
    for aside, final in zip(written_aside, finals):
        os.replace(aside, final)
    fsync_path(out_dir)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if _MERGED_FILE.match(name) and path not in finals:
            os.remove(path)


def reshard(load_dir: str, out_dir: str, tensor_parallel_size: int, progress: bool = False) -> fmt.Manifest:
    """Write the whole checkpoint at `load_dir` to `out_dir` at TP degree `tensor_parallel_size` (atomically).

    Every argument is checked before anything is written; a checkpoint already in
    `out_dir` stays the one that loads until the new one is complete, and a failed
    reshard removes the files it wrote.
    """
    check_output_folder(load_dir, out_dir, "checkpoint")
    manifest = verify(load_dir, progress)
    check_tensor_parallel_size(tensor_parallel_size, manifest)
    save_id = uuid.uuid4().hex
    files, entries = [], {}
    with _writing(out_dir):
        try:
            with tqdm(total=len(manifest.tensors), unit="tensor", desc="reshard", disable=not progress) as bar:
                for rank in range(tensor_parallel_size):
                    source = ShardedSource(load_dir, manifest, rank, tensor_parallel_size)
                    source.check_loadable(source.names())
                    tensors = {}
                    for name in source.names():
                        entries[name] = manifest.tensors[name]
                        if fmt.file_holding(entries[name], rank) == rank:  # a tensor written once: in one file
                            tensors[name] = source.read(name)
                        bar.update(1 if rank == 0 else 0)
                    files.append(fmt.write_shard_file(out_dir, rank, save_id, tensors, source.structure))
            resharded = fmt.Manifest(tensor_parallel_size, save_id, manifest.model_key, files, entries)
            fmt.write_manifest(out_dir, resharded)
        except BaseException:
            for rank in range(tensor_parallel_size):
                fmt.remove_shard_file(out_dir, rank, save_id)
            raise
        fmt.remove_stale(out_dir, resharded)
    return resharded

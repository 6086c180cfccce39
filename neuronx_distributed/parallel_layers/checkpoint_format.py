"""The on-disk layout of a sharded checkpoint: shard files, the manifest, checksums, atomic writes.

    save_dir/manifest.json                          written last, by an atomic rename
    save_dir/tp_rank_00/checkpoint-<save_id>.safetensors
    save_dir/tp_rank_01/checkpoint-<save_id>.safetensors

Each shard file holds one TP rank's tensors, but for those the manifest records as
written once (a replicated tensor whose entry has `file`: the TP rank whose file
holds the only copy; `file_holding` says where any rank finds a tensor; format
version 2, version 1 files hold every tensor). Its safetensors metadata holds the
rank's whole state structure as JSON (see `state_tree`), the TP rank and the
`save_id` it was written for, so a file copied into another rank's place or from
another save is refused even with a matching checksum. The manifest records each
file's crc32 and (version 3) the crc32 of each of its tensors: a load checks the
header of each file it reads and the tensors it reads (`verify_tensors`), not
whole files it needs a few tensors of; `verify_file` checks every byte. Every
save writes files under a fresh `save_id`, so the files of the previous
checkpoint stay intact until the new manifest replaces the old one; only then
are they removed.

Reading trusts nothing on disk: the manifest is checked against its schema
(`manifest_schema`), and each shard file, before safetensors opens it, must be a
regular file inside the checkpoint folder of the recorded size whose header
agrees with the manifest (names, dtypes, shapes, offsets, rank, save).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from zlib_ng.zlib_ng import crc32, crc32_combine

from ..durable import replace_with_text
from ..errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    TracedModelFolderError,
)
from .checkpoint_storage import drop_cached_pages, publish, write_aside, write_safetensors
from .manifest_schema import (  # noqa: F401 - the format's names, used as fmt.<name>
    CHECKSUM,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCAL,
    REPLICATED,
    SAFETENSORS_DTYPES,
    SHARDED,
    check_manifest,
    rank_folder,
    shard_file_path,
)
from .resharding import Part, logical_size, stride_parts
from .state_tree import TensorRef, decode, tensor_names

MANIFEST_NAME = "manifest.json"
SAVE_LOCK_NAME = ".nxd-save.lock"  # held by the process writing the folder (`folder_lock`)
TRACED_MODEL_MANIFEST = "traced_model.json"  # trace.parallel_model_save's manifest
STRUCTURE_KEY = "nxd.structure"
TP_RANK_KEY = "nxd.tp_rank"
SAVE_ID_KEY = "nxd.save_id"
_RANK_FOLDER = re.compile(r"^tp_rank_(\d+)$")
_SHARD_FILE = re.compile(r"^checkpoint-[0-9a-f]+\.safetensors(\.tmp)?$")
_CHECKSUM_CHUNK_BYTES = 1024 * 1024  # small enough to stay in the CPU's cache between read and crc32
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class TensorEntry:
    """A tensor of the checkpoint: its global (unsharded) shape, dtype and layout across TP ranks.

    `parts` (written only when set): the partition dim is made of parts of these sizes
    (`resharding.Part`: size, replication, block), e.g. a fused GQA weight or replicated KV
    heads; `shape` is then the stored shape, every copy included, and `logical_shape` the
    model's tensor (each block once). `file` (written only when set): a replicated tensor
    stored once, in the shard file of that TP rank.
    """

    shape: list[int]
    dtype: str
    layout: str
    partition_dim: int | None = None
    partition_stride: int = 1
    parts: list[dict] | None = None
    file: int | None = None

    def row_parts(self) -> tuple[Part, ...]:
        """The parts of a sharded tensor's partition dim (equal parts of its stride when none are recorded)."""
        if self.parts is not None:
            return tuple(Part(**part) for part in self.parts)
        return stride_parts(self.shape[self.partition_dim], self.partition_stride)

    @property
    def logical_shape(self) -> list[int]:
        """The shape of the model's tensor: the stored shape with each replicated block counted once."""
        if self.parts is None:
            return list(self.shape)
        shape = list(self.shape)
        shape[self.partition_dim] = logical_size(self.row_parts())
        return shape

    @property
    def nbytes(self) -> int:
        """Size of the whole (unsharded, logical) tensor."""
        return math.prod(self.logical_shape) * getattr(torch, self.dtype).itemsize


@dataclass
class FileEntry:
    """A shard file: its path relative to the checkpoint folder, size and checksum; `tensor_crc32` (version 3,
    written only when set): name -> crc32 of each tensor's bytes in the file."""

    path: str
    bytes: int
    crc32: str
    tensor_crc32: dict[str, str] | None = None


@dataclass
class Manifest:
    """What a complete checkpoint holds; `files[r]` is TP rank r's shard file."""

    tensor_parallel_size: int
    save_id: str
    model_key: str | None
    files: list[FileEntry]
    tensors: dict[str, TensorEntry]
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    checksum: str = CHECKSUM
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        raw = {
            "tensor_parallel_size": self.tensor_parallel_size, "save_id": self.save_id, "model_key": self.model_key,
            "files": [_without_unset(vars(entry), ("tensor_crc32",)) for entry in self.files],
            # plain tensors keep the entry that readers without parts or file know
            "tensors": {name: _without_unset(vars(entry), ("parts", "file")) for name, entry in self.tensors.items()},
            "format": self.format, "version": self.version, "checksum": self.checksum, "extra": self.extra,
        }
        return json.dumps(raw, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """The manifest in `text`; CheckpointCorruptError saying what is wrong unless it fits the schema."""
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise CheckpointCorruptError(f"the manifest is not valid JSON ({error}); the checkpoint is damaged.") from error
        check_manifest(raw)
        raw["files"] = [FileEntry(**entry) for entry in raw["files"]]
        raw["tensors"] = {name: TensorEntry(**entry) for name, entry in raw["tensors"].items()}
        return cls(**raw)


def _without_unset(fields: dict, optional: tuple[str, ...]) -> dict:
    """`fields` without the `optional` ones that are None."""
    return {key: value for key, value in fields.items() if value is not None or key not in optional}


def file_holding(entry: TensorEntry, tp_rank: int) -> int:
    """The saved TP rank whose shard file holds TP rank `tp_rank`'s copy of `entry`: its own, or the one file of a
    tensor written once. Save, load, reshard, merge and verify all find tensors through it."""
    return tp_rank if entry.file is None else entry.file


def checksum_file(path: str, progress: Callable[[int], object] | None = None, limit: int | None = None) -> tuple[str, int]:
    """(crc32 as 8 hex digits, size in bytes) of the file at `path`; `progress(n)` after each chunk.

    With `limit`, reads at most `limit + 1` bytes (enough to tell that the file is longer).
    The file is read a chunk at a time into one small buffer that stays in the CPU's
    cache while crc32 runs over it (faster than mapping the file: no page faults).
    """
    crc, size = 0, 0
    buffer = memoryview(bytearray(_CHECKSUM_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as file:
        while limit is None or size <= limit:
            wanted = _CHECKSUM_CHUNK_BYTES if limit is None else min(_CHECKSUM_CHUNK_BYTES, limit + 1 - size)
            count = file.readinto(buffer[:wanted])
            if not count:
                break
            crc = crc32(buffer[:count], crc)
            size += count
            if progress is not None:
                progress(count)
    return f"{crc:08x}", size


def _checksum_range(fd: int, offset: int, length: int, buffer: memoryview, path: str,
                    progress: Callable[[int], object] | None = None) -> int:
    """crc32 of `length` bytes of the open file from `offset`, read through `buffer`; CheckpointCorruptError if the
    file ends first."""
    crc, end = 0, offset + length
    while offset < end:
        count = os.preadv(fd, [buffer[:min(len(buffer), end - offset)]], offset)
        if not count:
            raise CheckpointCorruptError(f"{path} ended while checking it: it changed after it was checked; load again.")
        crc = crc32(buffer[:count], crc)
        offset += count
        if progress is not None:
            progress(count)
    return crc


def remove_shard_file(save_dir: str, tp_rank: int, save_id: str) -> None:
    """Delete a rank's shard file of save `save_id`, finished or still written aside, where it exists
    (the clean-up after a failed save, reshard or convert; an OSError here never hides the failure)."""
    final = os.path.join(save_dir, shard_file_path(tp_rank, save_id))
    for path in (final, final + ".tmp"):
        with contextlib.suppress(OSError):
            os.remove(path)


def write_shard_file(save_dir: str, tp_rank: int, save_id: str, tensors: dict[str, torch.Tensor], structure) -> FileEntry:
    """Write a rank's tensors and structure aside, fsync, rename into place; return its manifest entry.

    `tensors` must be CPU and contiguous. The checksums (the file's and each tensor's)
    are computed from them while the file is written (`checkpoint_storage.write_safetensors`),
    instead of reading the file back. The cached pages of the rank's earlier shard files, which this save
    replaces, are dropped first (`drop_cached_pages`).
    """
    relative = shard_file_path(tp_rank, save_id)
    final = os.path.join(save_dir, relative)
    folder = os.path.dirname(final)
    os.makedirs(folder, exist_ok=True)
    drop_cached_pages(os.path.join(folder, name) for name in os.listdir(folder) if _SHARD_FILE.match(name))
    metadata = {
        "format": "pt",
        STRUCTURE_KEY: json.dumps(structure, separators=(",", ":")),
        TP_RANK_KEY: str(tp_rank),
        SAVE_ID_KEY: save_id,
    }
    crc, size, tensor_crcs = write_aside(final, lambda aside: write_safetensors(aside, tensors, metadata))
    publish(final + ".tmp", final)
    return FileEntry(path=relative, bytes=size, crc32=crc, tensor_crc32=tensor_crcs)


def write_manifest(save_dir: str, manifest: Manifest) -> None:
    """Make the checkpoint visible: write the manifest aside, fsync, and rename it over the old one."""
    final = os.path.join(save_dir, MANIFEST_NAME)
    replace_with_text(final, manifest.to_json(), f"{final}.{manifest.save_id}.tmp")


def _regular_file(path: str, what: str) -> os.stat_result:
    """stat of `path`, refusing (before anything opens it) what is not a regular file: a FIFO or device would hang."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} is missing ({what}); copy the whole checkpoint folder.") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointCorruptError(
            f"{path} ({what}) is not a regular file (a folder, FIFO, socket or device); a checkpoint holds only "
            "the files that save wrote: restore the checkpoint folder from a copy."
        )
    return info


def read_manifest(load_dir: str) -> Manifest:
    """The manifest of the checkpoint at `load_dir`, checked against its schema, with errors that say what is wrong."""
    path = os.path.join(load_dir, MANIFEST_NAME)
    if not os.path.isdir(load_dir):
        what = "a file, not a folder" if os.path.exists(load_dir) else "no such folder"
        raise CheckpointNotFoundError(
            f"no checkpoint folder at {load_dir!r} ({what}); pass the folder that parallel_layers.save wrote "
            "(for a torch.save or safetensors file, load(..., sharded=False))."
        )
    if not os.path.lexists(path):
        if os.path.exists(os.path.join(load_dir, TRACED_MODEL_MANIFEST)):
            raise TracedModelFolderError(
                f"{load_dir!r} holds a traced model (trace.parallel_model_save), not a checkpoint of "
                "parallel_layers.save; load it with neuronx_distributed.trace.parallel_model_load."
            )
        if any(_RANK_FOLDER.match(name) for name in os.listdir(load_dir)):
            raise IncompleteCheckpointError(
                f"{load_dir!r} has tp_rank_* folders but no {MANIFEST_NAME}: the save that wrote them did not "
                "finish (a rank failed or was killed), so it is not a checkpoint; load an earlier checkpoint or save again."
            )
        raise CheckpointNotFoundError(
            f"no {MANIFEST_NAME} in {load_dir!r}: not a sharded checkpoint written by parallel_layers.save; "
            "for a torch.save / safetensors / Hugging Face checkpoint pass sharded=False."
        )
    _regular_file(path, "the checkpoint's manifest")
    with open(path, "rb") as file:
        text = file.read()
    try:
        manifest = Manifest.from_json(text)
    except CheckpointCorruptError as error:
        raise CheckpointCorruptError(f"{path}: {error}") from None
    for entry in manifest.files:
        if not os.path.lexists(os.path.join(load_dir, entry.path)):
            folder = os.path.dirname(entry.path)
            raise CheckpointNotFoundError(
                f"{os.path.join(load_dir, entry.path)} is missing (shard folder {folder!r} of a TP="
                f"{manifest.tensor_parallel_size} checkpoint); copy the whole checkpoint folder, every tp_rank_* included."
            )
    return manifest


def shard_path(load_dir: str, entry: FileEntry) -> str:
    """The path of a manifest's shard file, refused unless it is a regular file inside `load_dir` of the recorded size.

    A symbolic link is followed only while it stays inside the checkpoint folder.
    """
    path = os.path.join(load_dir, entry.path)
    root, real = os.path.realpath(load_dir), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise CheckpointCorruptError(
            f"{path} resolves to {real}, outside the checkpoint folder {root}; a checkpoint holds its own files "
            "(copy them in instead of linking to them)."
        )
    info = _regular_file(path, f"the shard file of {os.path.dirname(entry.path)}")
    if info.st_size != entry.bytes:
        raise CheckpointCorruptError(
            f"{path} has {info.st_size} bytes but the manifest records {entry.bytes}: the file was truncated or "
            "changed after saving; restore it from a copy or load an earlier checkpoint."
        )
    return path


def verify_file(load_dir: str, entry: FileEntry, progress: Callable[[int], object] | None = None) -> None:
    """Raise CheckpointCorruptError unless the file's size and checksum (and each tensor's, where the manifest
    records them) match its manifest entry: every byte of the file is checked."""
    path = shard_path(load_dir, entry)
    if entry.tensor_crc32 is None:
        crc, size = checksum_file(path, progress, limit=entry.bytes)
        if (crc, size) != (entry.crc32, entry.bytes):
            raise _mismatch(path, f"crc32 {crc} vs {entry.crc32}, {size} vs {entry.bytes} bytes")
        return
    crc, tensor_crcs = checksum_tensors(path, entry.bytes, progress)
    if tensor_crcs != entry.tensor_crc32:
        differ = sorted(set(tensor_crcs.items()) ^ set(entry.tensor_crc32.items()))[0][0]
        raise _mismatch(path, f"tensor {differ!r:.100}: crc32 {tensor_crcs.get(differ)} in the file, "
                        f"{entry.tensor_crc32.get(differ)} saved")
    if crc != entry.crc32:
        raise _mismatch(path, f"crc32 {crc} vs {entry.crc32}")


def checksum_tensors(path: str, size: int | None = None, progress: Callable[[int], object] | None = None,
                     ) -> tuple[str, dict[str, str]]:
    """(crc32 of the file, name -> crc32 of each tensor's bytes), 8 hex digits each, of the safetensors file at
    `path` (of `size` bytes, default its size on disk) in one pass; CheckpointCorruptError if its header is
    malformed. `progress(n)` after each chunk."""
    size = os.path.getsize(path) if size is None else size
    try:
        header, data_bytes, crc = _read_header(path, size)
        header.pop("__metadata__", None)
        tensors, begins = _check_header_tensors(header, data_bytes)
    except (ValueError, RecursionError) as error:
        raise _corrupt(path, str(error) or "nested too deeply") from None
    shard = ShardFile(path, None, frozenset(tensors), _spans(tensors, begins, size - data_bytes))
    if progress is not None:
        progress(size - data_bytes)
    tensor_crcs, buffer = {}, memoryview(bytearray(_CHECKSUM_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as file:
        for name in sorted(tensors, key=begins.get):
            offset, nbytes = shard.byte_span(name)
            tensor_crc = _checksum_range(file.fileno(), offset, nbytes, buffer, path, progress)
            tensor_crcs[name] = f"{tensor_crc:08x}"
            crc = crc32_combine(crc, tensor_crc, nbytes)
    return f"{crc:08x}", tensor_crcs


def verify_tensors(shard: ShardFile, entry: FileEntry, names, progress: Callable[[int], object] | None = None) -> None:
    """Raise CheckpointCorruptError unless the header of `shard` (a file of a version-3 checkpoint, `entry` its
    manifest entry) and its tensors `names` match the manifest's checksums: the header's crc32 combined with the
    recorded crc32 of every tensor must give the file's, and each of `names` must have its own. Reads only the
    bytes of `names`."""
    path, spans = shard.path, {name: shard.byte_span(name) for name in shard.spans}
    if set(entry.tensor_crc32) != set(spans):
        odd = sorted(set(entry.tensor_crc32) ^ set(spans))[:10]
        raise _corrupt(path, f"its tensors and the tensors the manifest has checksums of differ in {odd}")
    crc = shard.header_crc32
    for name, (_, nbytes) in sorted(spans.items(), key=lambda item: item[1][0]):
        crc = crc32_combine(crc, int(entry.tensor_crc32[name], 16), nbytes)
    if f"{crc:08x}" != entry.crc32:
        raise _mismatch(path, f"its header and the tensors' recorded crc32s do not give the file's, {entry.crc32}")
    buffer = memoryview(bytearray(_CHECKSUM_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as file:
        for name in sorted(set(names), key=lambda name: spans[name][0]):
            offset, nbytes = spans[name]
            found = f"{_checksum_range(file.fileno(), offset, nbytes, buffer, path, progress):08x}"
            if found != entry.tensor_crc32[name]:
                raise _mismatch(path, f"tensor {name!r:.100} has crc32 {found} but {entry.tensor_crc32[name]} was saved")


def _mismatch(path: str, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path} does not match the manifest ({problem}): the file was damaged or changed after saving; restore it "
        "from a copy or load an earlier checkpoint."
    )


@dataclass
class ShardFile:
    """A shard file whose header agrees with the manifest: its path, state structure, tensor names, where
    each tensor's bytes lie (`spans`: name -> (torch dtype, shape, byte offset in the file)), and the crc32 of
    the bytes before them (the length and JSON header)."""

    path: str
    structure: object
    names: frozenset[str]
    spans: dict[str, tuple[torch.dtype, list[int], int]] = field(default_factory=dict)
    header_crc32: int = 0

    def byte_span(self, name: str) -> tuple[int, int]:
        """(offset in the file, length) of tensor `name`'s bytes."""
        dtype, shape, offset = self.spans[name]
        return offset, math.prod(shape) * dtype.itemsize


def _local_shape(entry: TensorEntry, tp_size: int) -> list[int]:
    """The shape of one saved rank's tensor of `entry`."""
    shape = list(entry.shape)
    if entry.layout == SHARDED:
        shape[entry.partition_dim] //= tp_size
    return shape


def _read_header(path: str, size: int) -> tuple[dict, int, int]:
    """(JSON header, bytes of tensor data, crc32 of the bytes up to them) of the safetensors file at `path` (`size`
    bytes), read no further than the header."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"its header length {header_bytes} exceeds the file")
        text = file.read(header_bytes)
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, size - 8 - header_bytes, crc32(text, crc32(prefix))


def _check_header_tensors(header: dict, data_bytes: int) -> tuple[dict[str, tuple[str, list[int]]], dict[str, int]]:
    """(name -> (safetensors dtype, shape), name -> offset in the data area), after checking that the tensors tile
    the data area exactly."""
    tensors, spans, begins = {}, [], {}
    item_bytes = dict(SAFETENSORS_DTYPES.values())
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r:.100} has a malformed entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in item_bytes:
            raise ValueError(f"tensor {name!r:.100} has dtype {dtype!r:.40}")
        if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
            raise ValueError(f"tensor {name!r:.100} has shape {shape!r:.80}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(at) is int for at in offsets):
            raise ValueError(f"tensor {name!r:.100} has data_offsets {offsets!r:.80}")
        if offsets[1] - offsets[0] != math.prod(shape) * item_bytes[dtype]:
            raise ValueError(f"tensor {name!r:.100} has {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}")
        tensors[name] = (dtype, shape)
        begins[name] = offsets[0]
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise ValueError("its tensors overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise ValueError(f"its tensors hold {end} bytes but the file holds {data_bytes}")
    return tensors, begins


def check_shard_file(load_dir: str, manifest: Manifest, tp_rank: int) -> ShardFile:
    """TP rank `tp_rank`'s shard file, checked against the manifest before safetensors opens it.

    Refused with CheckpointCorruptError unless it is a regular file inside the folder of
    the recorded size, written for this rank by this save (its metadata says so), whose
    tensors are exactly those its structure names (but those written once into another
    rank's file: `file_holding`), each (but per-rank `local` ones)
    with the manifest's dtype and this rank's shape. Reads only the header (no
    checksum: see `verify_tensors` and `verify_file`).
    """
    entry = manifest.files[tp_rank]
    path = shard_path(load_dir, entry)
    try:
        header, data_bytes, header_crc = _read_header(path, entry.bytes)
        metadata = header.pop("__metadata__", None)
        if not isinstance(metadata, dict) or not isinstance(metadata.get(STRUCTURE_KEY), str):
            raise ValueError("its metadata holds no state structure")
        tensors, begins = _check_header_tensors(header, data_bytes)
        structure = json.loads(metadata[STRUCTURE_KEY])
        names = list(dict.fromkeys(tensor_names(structure)))
        decode(structure, TensorRef)  # raises CheckpointCorruptError on a malformed entry
    except (ValueError, RecursionError) as error:  # json's errors and ours: all say what is malformed
        raise _corrupt(path, str(error) or "nested too deeply") from None
    saved_rank, save_id = metadata.get(TP_RANK_KEY), metadata.get(SAVE_ID_KEY)
    if (saved_rank, save_id) != (str(tp_rank), manifest.save_id):
        raise _corrupt(
            path, f"it was written as TP rank {saved_rank} of save {save_id}, but the manifest lists it as TP rank "
            f"{tp_rank} of save {manifest.save_id}: files of different ranks or saves were swapped or copied in"
        )
    unlisted = next((name for name in names if name not in manifest.tensors), None)
    if unlisted is not None:
        raise _corrupt(path, f"it holds {unlisted!r:.100}, which the manifest does not list")
    names = [name for name in names if file_holding(manifest.tensors[name], tp_rank) == tp_rank]  # the rest: elsewhere
    if set(names) != set(tensors):
        odd = sorted(set(names) ^ set(tensors))[:10]
        raise _corrupt(path, f"its structure and its tensors differ in {odd}")
    for name in names:
        recorded = manifest.tensors[name]
        if recorded.layout == LOCAL:
            continue  # each rank's own value: the manifest records TP rank 0's dtype and shape only
        expected = (SAFETENSORS_DTYPES[recorded.dtype][0], _local_shape(recorded, manifest.tensor_parallel_size))
        if tensors[name] != expected:
            raise _corrupt(
                path, f"{name!r:.100} is {tensors[name][1]} {tensors[name][0]} in the file but the manifest implies "
                f"{expected[1]} {expected[0]} for TP rank {tp_rank} of {manifest.tensor_parallel_size}"
            )
    return ShardFile(path, structure, frozenset(names), _spans(tensors, begins, entry.bytes - data_bytes), header_crc)


def _spans(tensors: dict[str, tuple[str, list[int]]], begins: dict[str, int], data_start: int) -> dict:
    """`ShardFile.spans` from what `_check_header_tensors` returns and where the data area starts."""
    torch_dtypes = {code: getattr(torch, name) for name, (code, _) in SAFETENSORS_DTYPES.items()}
    return {name: (torch_dtypes[dtype], shape, data_start + begins[name]) for name, (dtype, shape) in tensors.items()}


def _corrupt(path: str, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path} is not a valid shard file of this checkpoint ({problem}); restore the checkpoint folder from a "
        "copy or load an earlier checkpoint."
    )


def _cleanup_owner(folder_rank: int, tp_size: int) -> int:
    """The TP rank that removes stale files in folder tp_rank_<folder_rank>: that rank, TP rank 0 beyond `tp_size`."""
    return folder_rank if folder_rank < tp_size else 0


def stale_paths(save_dir: str, manifest: Manifest | None, tp_rank: int | None = None) -> list[str]:
    """Shard files in `save_dir` that the manifest does not reference (left by other or unfinished saves).

    With `tp_rank`, only that rank's share, so that the ranks clean up in parallel:
    its own folder, and for TP rank 0 everything outside the manifest's rank folders.
    """
    referenced = {entry.path for entry in manifest.files} if manifest else set()
    tp_size = manifest.tensor_parallel_size if manifest else 0
    stale = []
    for folder in sorted(os.listdir(save_dir)):
        match = _RANK_FOLDER.match(folder)
        owned = match and (tp_rank is None or _cleanup_owner(int(match.group(1)), tp_size) == tp_rank)
        if owned and os.path.isdir(os.path.join(save_dir, folder)):
            names = sorted(os.listdir(os.path.join(save_dir, folder)))
            stale += [f"{folder}/{name}" for name in names if _SHARD_FILE.match(name) and f"{folder}/{name}" not in referenced]
    if tp_rank in (None, 0):
        stale += sorted(name for name in os.listdir(save_dir) if name.startswith(MANIFEST_NAME + ".") and name.endswith(".tmp"))
    return stale


def remove_stale(save_dir: str, manifest: Manifest, tp_rank: int | None = None) -> None:
    """Delete what `stale_paths` lists, then the tp_rank folders beyond the manifest's TP degree left empty.

    With `tp_rank`, only that rank's share (see `stale_paths`); the empty folders are TP rank 0's.
    """
    for relative in stale_paths(save_dir, manifest, tp_rank):
        os.remove(os.path.join(save_dir, relative))
    if tp_rank not in (None, 0):
        return
    for folder in os.listdir(save_dir):
        match = _RANK_FOLDER.match(folder)
        path = os.path.join(save_dir, folder)
        if match and int(match.group(1)) >= manifest.tensor_parallel_size and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)

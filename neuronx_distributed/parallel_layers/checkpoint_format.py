"""The on-disk layout of a sharded checkpoint: shard files, the manifest, checksums, atomic writes.

    save_dir/manifest.json                          written last, by an atomic rename
    save_dir/tp_rank_00/checkpoint-<save_id>.safetensors
    save_dir/tp_rank_01/checkpoint-<save_id>.safetensors

Each shard file holds one TP rank's tensors; its safetensors metadata holds the
rank's whole state structure as JSON (see `state_tree`). Every save writes files
under a fresh `save_id`, so the files of the previous checkpoint stay intact
until the new manifest replaces the old one; only then are they removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..durable import fsync_path, replace_with_text
from ..errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
)

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "neuronx_distributed.checkpoint"
FORMAT_VERSION = 1
STRUCTURE_KEY = "nxd.structure"
CHECKSUM = "crc32"
_RANK_FOLDER = re.compile(r"^tp_rank_(\d+)$")
_SHARD_FILE = re.compile(r"^checkpoint-[0-9a-f]+\.safetensors(\.tmp)?$")
_CHUNK_BYTES = 16 * 1024 * 1024

# Layouts of a tensor across the TP ranks of a checkpoint.
SHARDED = "sharded"  # each rank holds a slice along partition_dim (with partition_stride)
REPLICATED = "replicated"  # every rank holds the same tensor
LOCAL = "local"  # each rank holds its own value; loadable only at the same TP degree


def rank_folder(tp_rank: int) -> str:
    """The folder of TP rank `tp_rank`: tp_rank_00, tp_rank_01, ..."""
    return f"tp_rank_{tp_rank:02d}"


def shard_file_path(tp_rank: int, save_id: str) -> str:
    """Path of a rank's shard file relative to the checkpoint folder."""
    return f"{rank_folder(tp_rank)}/checkpoint-{save_id}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class TensorEntry:
    """A tensor of the checkpoint: its global (unsharded) shape, dtype and layout across TP ranks."""

    shape: list[int]
    dtype: str
    layout: str
    partition_dim: int | None = None
    partition_stride: int = 1

    @property
    def nbytes(self) -> int:
        """Size of the whole (unsharded) tensor."""
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass
class FileEntry:
    """A shard file: its path relative to the checkpoint folder, size and checksum."""

    path: str
    bytes: int
    crc32: str


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
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["files"] = [FileEntry(**entry) for entry in raw["files"]]
        raw["tensors"] = {name: TensorEntry(**entry) for name, entry in raw["tensors"].items()}
        return cls(**raw)


def checksum_file(path: str, progress: Callable[[int], object] | None = None) -> tuple[str, int]:
    """(crc32 as 8 hex digits, size in bytes) of the file at `path`; `progress(n)` after each chunk."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as file:
        buffer = bytearray(_CHUNK_BYTES)
        view = memoryview(buffer)
        while count := file.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
            size += count
            if progress is not None:
                progress(count)
    return f"{crc:08x}", size


def _written_checksum(file, tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(crc32, size) of a safetensors file just written from `tensors`, from memory but its header.

    The file is the 8-byte header length, the header, then each tensor's bytes back
    to back in the order of their offsets; None if it is laid out otherwise.
    """
    (header_bytes,) = struct.unpack("<Q", os.pread(file.fileno(), 8, 0))
    prefix = os.pread(file.fileno(), 8 + header_bytes, 0)
    header = json.loads(prefix[8:])
    header.pop("__metadata__", None)
    crc, end = zlib.crc32(prefix), 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = info["data_offsets"]
        if begin != end:
            return None
        if stop > begin:
            crc = zlib.crc32(tensors[name].reshape(-1).view(torch.uint8).numpy(), crc)
        end = stop
    size = 8 + header_bytes + end
    return (f"{crc:08x}", size) if size == os.fstat(file.fileno()).st_size else None


def write_shard_file(save_dir: str, tp_rank: int, save_id: str, tensors: dict[str, torch.Tensor], structure) -> FileEntry:
    """Write a rank's tensors and structure aside, fsync, rename into place; return its manifest entry.

    `tensors` must be CPU and contiguous. The checksum is computed from them while
    the file is flushed to disk, instead of reading the file back.
    """
    relative = shard_file_path(tp_rank, save_id)
    final = os.path.join(save_dir, relative)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    partial = final + ".tmp"
    metadata = {"format": "pt", STRUCTURE_KEY: json.dumps(structure, separators=(",", ":"))}
    save_file(tensors, partial, metadata=metadata)
    with open(partial, "rb") as file, ThreadPoolExecutor(max_workers=1) as flusher:
        flushed = flusher.submit(os.fsync, file.fileno())
        crc, size = _written_checksum(file, tensors) or checksum_file(partial)
        flushed.result()
    os.replace(partial, final)
    fsync_path(os.path.dirname(final))
    return FileEntry(path=relative, bytes=size, crc32=crc)


def write_manifest(save_dir: str, manifest: Manifest) -> None:
    """Make the checkpoint visible: write the manifest aside, fsync, and rename it over the old one."""
    final = os.path.join(save_dir, MANIFEST_NAME)
    replace_with_text(final, manifest.to_json(), f"{final}.{manifest.save_id}.tmp")


def read_manifest(load_dir: str) -> Manifest:
    """The manifest of the checkpoint at `load_dir`, with errors that say what is wrong."""
    path = os.path.join(load_dir, MANIFEST_NAME)
    if not os.path.isdir(load_dir):
        raise CheckpointNotFoundError(f"no checkpoint folder at {load_dir!r}; check the path.")
    if not os.path.exists(path):
        if any(_RANK_FOLDER.match(name) for name in os.listdir(load_dir)):
            raise IncompleteCheckpointError(
                f"{load_dir!r} has tp_rank_* folders but no {MANIFEST_NAME}: the save that wrote them did not "
                "finish (a rank failed or was killed), so it is not a checkpoint; load an earlier checkpoint or save again."
            )
        raise CheckpointNotFoundError(
            f"no {MANIFEST_NAME} in {load_dir!r}: not a sharded checkpoint written by parallel_layers.save; "
            "for a torch.save / safetensors / Hugging Face checkpoint pass sharded=False."
        )
    try:
        with open(path) as file:
            manifest = Manifest.from_json(file.read())
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointCorruptError(f"{path} cannot be read ({error}); the checkpoint is damaged.") from error
    if manifest.format != FORMAT_NAME or manifest.version > FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"{path} is format {manifest.format!r} version {manifest.version}; this library reads "
            f"{FORMAT_NAME!r} up to version {FORMAT_VERSION} (upgrade neuronx_distributed)."
        )
    for entry in manifest.files:
        if not os.path.exists(os.path.join(load_dir, entry.path)):
            folder = os.path.dirname(entry.path)
            raise CheckpointNotFoundError(
                f"{os.path.join(load_dir, entry.path)} is missing (shard folder {folder!r} of a TP="
                f"{manifest.tensor_parallel_size} checkpoint); copy the whole checkpoint folder, every tp_rank_* included."
            )
    return manifest


def verify_file(load_dir: str, entry: FileEntry, progress: Callable[[int], object] | None = None) -> None:
    """Raise CheckpointCorruptError unless the file's size and checksum match its manifest entry."""
    path = os.path.join(load_dir, entry.path)
    crc, size = checksum_file(path, progress)
    if (crc, size) != (entry.crc32, entry.bytes):
        raise CheckpointCorruptError(
            f"{path} does not match the manifest (crc32 {crc} vs {entry.crc32}, {size} vs {entry.bytes} bytes): "
            "the file was damaged or changed after saving; restore it from a copy or load an earlier checkpoint."
        )


def read_structure(load_dir: str, entry: FileEntry):
    """The state structure (JSON) stored in a shard file's metadata."""
    with safe_open(os.path.join(load_dir, entry.path), framework="pt") as file:
        return json.loads(file.metadata()[STRUCTURE_KEY])


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

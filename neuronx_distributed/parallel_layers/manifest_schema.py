"""The schema of a sharded checkpoint's `manifest.json`, checked in one place: `check_manifest`.

Every field's type and range is checked before anything reads a shard file, so a
damaged or hand-edited manifest fails with `CheckpointCorruptError` naming the
field, never with a raw `KeyError` / `TypeError` deep inside a load. Shard file
paths are not free text: file r of a save is `tp_rank_<r>/checkpoint-<save_id>.safetensors`
(relative, inside the checkpoint folder, no `..`), the only name `save` writes.
"""

from __future__ import annotations

import re

from ..errors import CheckpointCorruptError

FORMAT_NAME = "neuronx_distributed.checkpoint"
# 3: each file entry records each tensor's crc32 (`tensor_crc32`), so a load verifies only what it reads;
# 2: replicated tensors may be written once (`file`); 1: every file holds every tensor.
FORMAT_VERSION = 3
CHECKSUM = "crc32"

# Layouts of a tensor across the TP ranks of a checkpoint.
SHARDED = "sharded"  # each rank holds a slice along partition_dim (with partition_stride)
REPLICATED = "replicated"  # every rank holds the same tensor
LOCAL = "local"  # each rank holds its own value; loadable only at the same TP degree
LAYOUTS = (SHARDED, REPLICATED, LOCAL)

# torch dtype name (as the manifest records it) -> safetensors header dtype and bytes per element.
SAFETENSORS_DTYPES = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint64": ("U64", 8), "uint32": ("U32", 4), "uint16": ("U16", 2), "uint8": ("U8", 1), "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1), "complex64": ("C64", 8),
}

_SAVE_ID = re.compile(r"^[0-9a-f]{1,64}$")
_CRC32 = re.compile(r"^[0-9a-f]{8}$")
_TOP_LEVEL = {"tensor_parallel_size", "save_id", "model_key", "files", "tensors", "format", "version", "checksum", "extra"}
_FILE_FIELDS = {"path", "bytes", "crc32"}
_TENSOR_CHECKSUMS = "tensor_crc32"  # name -> crc32 of the tensor's bytes in the file (version 3)
_TENSOR_FIELDS = {"shape", "dtype", "layout", "partition_dim", "partition_stride"}
_PART_FIELDS = {"size", "replication", "block"}
_MAX_RANK = 64  # dimensions of a tensor


def rank_folder(tp_rank: int) -> str:
    """The folder of TP rank `tp_rank`: tp_rank_00, tp_rank_01, ..."""
    return f"tp_rank_{tp_rank:02d}"


def shard_file_path(tp_rank: int, save_id: str) -> str:
    """Path of a rank's shard file relative to the checkpoint folder."""
    return f"{rank_folder(tp_rank)}/checkpoint-{save_id}.safetensors"


def _fail(where: str, problem: str):
    raise CheckpointCorruptError(
        f"manifest field {where} {problem}; the manifest is damaged or was edited by hand: restore the checkpoint "
        "folder from a copy, or load an earlier checkpoint."
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(value, where: str, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        _fail(where, f"is {value!r:.80}, not an integer {bound}")
    return value


def _fields(value, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"is a {type(value).__name__}, not an object")
    missing, unknown = required - set(value), set(value) - required - optional
    if missing:
        _fail(where, f"lacks {sorted(missing)}")
    if unknown:
        _fail(where, f"has unknown fields {sorted(unknown)[:10]} (written by a newer version?)")
    return value


def _check_crc32(value, where: str) -> None:
    if not isinstance(value, str) or not _CRC32.match(value):
        _fail(where, f"is {value!r:.80}, not 8 lowercase hex digits")


def _check_file(entry, rank: int, save_id: str, version: int) -> None:
    where = f"files[{rank}]"
    _fields(entry, where, (_FILE_FIELDS | {_TENSOR_CHECKSUMS}) if version >= 3 else _FILE_FIELDS)
    if entry["path"] != shard_file_path(rank, save_id):
        _fail(f"{where}.path", f"is {entry['path']!r:.200}, not {shard_file_path(rank, save_id)!r} (the only name a save "
              "writes for that rank: relative, inside the checkpoint folder)")
    _int_field(entry["bytes"], f"{where}.bytes", 8)
    _check_crc32(entry["crc32"], f"{where}.crc32")
    if version >= 3:
        checksums = entry[_TENSOR_CHECKSUMS]
        if not isinstance(checksums, dict):
            _fail(f"{where}.{_TENSOR_CHECKSUMS}", f"is a {type(checksums).__name__}, not an object")
        for name, crc in checksums.items():
            _check_crc32(crc, f"{where}.{_TENSOR_CHECKSUMS}[{name!r:.200}]")


def _check_tensor(name: str, entry, tp_size: int, version: int) -> None:
    where = f"tensors[{name!r:.200}]"
    _fields(entry, where, _TENSOR_FIELDS, {"parts", "file"} if version >= 2 else {"parts"})
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_int(size) and size >= 0 for size in shape):
        _fail(f"{where}.shape", f"is {shape!r:.80}, not a list of at most {_MAX_RANK} sizes >= 0")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in SAFETENSORS_DTYPES:
        _fail(f"{where}.dtype", f"is {entry['dtype']!r:.80}, not one of {sorted(SAFETENSORS_DTYPES)}")
    if entry["layout"] not in LAYOUTS:
        _fail(f"{where}.layout", f"is {entry['layout']!r:.80}, not one of {list(LAYOUTS)}")
    stride = _int_field(entry["partition_stride"], f"{where}.partition_stride", 1)
    if "file" in entry:
        if entry["layout"] != REPLICATED:
            _fail(where, f"is {entry['layout']} but names the one file that holds it (only replicated tensors do)")
        _int_field(entry["file"], f"{where}.file", 0, tp_size - 1)
    if entry["layout"] != SHARDED:
        if entry["partition_dim"] is not None or stride != 1 or "parts" in entry:
            _fail(where, f"is {entry['layout']} but has a partition_dim, stride or parts (only sharded tensors do)")
        return
    dim = _int_field(entry["partition_dim"], f"{where}.partition_dim", 0, len(shape) - 1)
    if "parts" in entry:
        _check_parts(where, entry["parts"], shape[dim], stride, tp_size)
    if shape[dim] % (stride * tp_size):
        _fail(f"{where}.shape", f"has size {shape[dim]} along partition_dim {dim}, which a TP={tp_size} save with "
              f"stride {stride} cannot have written")


def _check_parts(where: str, parts, size: int, stride: int, tp_size: int) -> None:
    """The parts of a sharded tensor: blocks of whole copies, each part split evenly by the TP degree that saved it."""
    if not isinstance(parts, list) or not 1 <= len(parts) <= size or stride != 1:
        _fail(f"{where}.parts", f"is {parts!r:.80}, not a non-empty list of parts (with partition_stride 1)")
    total = 0
    for index, part in enumerate(parts):
        at = f"{where}.parts[{index}]"
        _fields(part, at, _PART_FIELDS)
        rows = _int_field(part["size"], f"{at}.size", 1)
        copies = _int_field(part["replication"], f"{at}.replication", 1)
        block = _int_field(part["block"], f"{at}.block", 1)
        if rows % (copies * block) or rows % tp_size:
            _fail(at, f"has {rows} rows, not whole blocks of {block} x {copies} copies split by TP={tp_size}")
        total += rows
    if total != size:
        _fail(f"{where}.parts", f"add up to {total} rows, but the partition dim has {size}")


def check_manifest(raw) -> None:
    """Raise CheckpointCorruptError (naming the field) unless `raw`, the parsed JSON, is a valid manifest."""
    _fields(raw, "(the whole manifest)", _TOP_LEVEL)
    if raw["format"] != FORMAT_NAME:
        _fail("format", f"is {raw['format']!r:.80}, not {FORMAT_NAME!r}: not a checkpoint of parallel_layers.save")
    if not _is_int(raw["version"]) or raw["version"] > FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"the manifest is version {raw['version']!r:.40}; this library reads {FORMAT_NAME!r} up to version "
            f"{FORMAT_VERSION} (upgrade neuronx_distributed)."
        )
    _int_field(raw["version"], "version", 1)
    if raw["checksum"] != CHECKSUM:
        _fail("checksum", f"is {raw['checksum']!r:.80}, not {CHECKSUM!r}")
    tp_size = _int_field(raw["tensor_parallel_size"], "tensor_parallel_size", 1)
    if not isinstance(raw["save_id"], str) or not _SAVE_ID.match(raw["save_id"]):
        _fail("save_id", f"is {raw['save_id']!r:.80}, not 1 to 64 lowercase hex digits")
    if raw["model_key"] is not None and not isinstance(raw["model_key"], str):
        _fail("model_key", f"is a {type(raw['model_key']).__name__}, not a string or null")
    if not isinstance(raw["extra"], dict):
        _fail("extra", f"is a {type(raw['extra']).__name__}, not an object")
    files = raw["files"]
    if not isinstance(files, list) or len(files) != tp_size:
        count = len(files) if isinstance(files, list) else type(files).__name__
        _fail("files", f"has {count} entries, not one per TP rank ({tp_size})")
    for rank, entry in enumerate(files):
        _check_file(entry, rank, raw["save_id"], raw["version"])
    if not isinstance(raw["tensors"], dict):
        _fail("tensors", f"is a {type(raw['tensors']).__name__}, not an object")
    for name, entry in raw["tensors"].items():
        _check_tensor(name, entry, tp_size, raw["version"])

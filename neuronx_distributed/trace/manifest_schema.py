"""The schema of `traced_model.json`, checked in one place before anything reads its values.

`check_manifest(data)` walks the parsed JSON and raises `ManifestSchemaError`
naming the first field that is missing, of the wrong type or out of range (for
example `ranks[1].size`). Only a manifest that passes is turned into objects,
so no reader downstream meets a KeyError, a negative size or a path outside
the save folder.
"""

from __future__ import annotations

import re

import torch

FORMAT = "neuronx_distributed.traced_model"
FORMAT_VERSION = 1
MAX_TP_DEGREE = 1024  # one worker process per rank: a bigger number is a corrupt file, not a model
MAX_STRUCTURE_DEPTH = 64
MAX_IO_BYTES = 1 << 40  # the shared arena holds every input and output tensor

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PROGRAM_FILE = r"model(-[0-9a-f]+)?\.pt2"


class ManifestSchemaError(ValueError):
    """A field of the manifest that does not fit the schema (the message names it)."""


def program_file_pattern(rank: int) -> re.Pattern:
    """The relative name rank `rank`'s program file must have: inside its own folder, nothing else."""
    return re.compile(rf"^tp_rank_{rank:02d}/{_PROGRAM_FILE}$")


def check_manifest(data) -> None:
    """Raise ManifestSchemaError unless `data` (parsed JSON) is a traced-model manifest of this format."""
    _check_object(data, "the manifest", required={"format", "format_version", "tp_degree", "inputs", "outputs", "ranks"},
                  optional={"torch_version", "io_aliases"})
    if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
        raise ManifestSchemaError(
            f"format {data['format']!r} version {data['format_version']!r} is not {FORMAT!r} version {FORMAT_VERSION}"
        )
    if "torch_version" in data:
        _check_type(data["torch_version"], str, "torch_version")
    tp_degree = _check_int(data["tp_degree"], "tp_degree", low=1, high=MAX_TP_DEGREE)
    io_bytes = _check_inputs(data["inputs"]) + _check_outputs(data["outputs"])
    if io_bytes > MAX_IO_BYTES:
        raise ManifestSchemaError(f"the inputs and outputs add up to {io_bytes} bytes, more than {MAX_IO_BYTES}")
    output_count = len(data["outputs"]["tensors"])
    for name, index in _check_type(data.get("io_aliases", {}), dict, "io_aliases").items():
        _check_int(index, f"io_aliases[{name!r}]", low=0, high=output_count - 1)
    ranks = _check_type(data["ranks"], list, "ranks")
    if len(ranks) != tp_degree:
        raise ManifestSchemaError(f"ranks has {len(ranks)} entries for tp_degree {tp_degree}")
    for rank, record in enumerate(ranks):
        _check_rank(record, rank, tp_degree)
    first = ranks[0]
    for rank, record in enumerate(ranks[1:], start=1):
        if record["collectives"] != first["collectives"] or record["groups"] != first["groups"]:
            raise ManifestSchemaError(
                f"ranks[{rank}] runs other collectives or groups than ranks[0]; every rank runs the same ones"
            )


def _check_inputs(inputs) -> int:
    _check_object(inputs, "inputs", required={"positional", "keyword"})
    positional = _check_type(inputs["positional"], list, "inputs.positional")
    keyword = _check_type(inputs["keyword"], dict, "inputs.keyword")
    total = sum(_check_spec(spec, f"inputs.positional[{index}]") for index, spec in enumerate(positional))
    for name, spec in keyword.items():
        if not name.isidentifier():
            raise ManifestSchemaError(f"inputs.keyword has the name {name!r}, which is not a Python identifier")
        total += _check_spec(spec, f"inputs.keyword[{name!r}]")
    return total


def _check_outputs(outputs) -> int:
    _check_object(outputs, "outputs", required={"tensors", "structure"})
    tensors = _check_type(outputs["tensors"], list, "outputs.tensors")
    total = sum(_check_spec(spec, f"outputs.tensors[{index}]") for index, spec in enumerate(tensors))
    _check_structure(outputs["structure"], "outputs.structure", len(tensors), 0)
    return total


def _check_spec(spec, where: str) -> int:
    """Check one tensor spec; return its size in bytes."""
    _check_object(spec, where, required={"shape", "dtype"})
    shape = _check_type(spec["shape"], list, f"{where}.shape")
    numel = 1
    for index, size in enumerate(shape):
        numel *= _check_int(size, f"{where}.shape[{index}]", low=0, high=MAX_IO_BYTES)
    dtype_name = _check_type(spec["dtype"], str, f"{where}.dtype")
    dtype = getattr(torch, dtype_name, None) if dtype_name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ManifestSchemaError(f"{where}.dtype {dtype_name!r} is not a torch dtype")
    return numel * dtype.itemsize


def _check_structure(node, where: str, tensor_count: int, depth: int) -> None:
    if depth > MAX_STRUCTURE_DEPTH:
        raise ManifestSchemaError(f"{where} nests deeper than {MAX_STRUCTURE_DEPTH} levels")
    if not isinstance(node, dict) or len(node) != 1:
        raise ManifestSchemaError(f"{where} must be an object with one of the keys tensor, value, dict, list, tuple")
    (kind, value), = node.items()
    if kind == "tensor":
        _check_int(value, f"{where}.tensor", low=0, high=tensor_count - 1)
    elif kind == "value":
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ManifestSchemaError(f"{where}.value must be null, a number or a string")
    elif kind == "dict":
        for index, pair in enumerate(_check_type(value, list, f"{where}.dict")):
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ManifestSchemaError(f"{where}.dict[{index}] must be a [name, value] pair")
            _check_structure(pair[1], f"{where}.dict[{index}]", tensor_count, depth + 1)
    elif kind in ("list", "tuple"):
        for index, item in enumerate(_check_type(value, list, f"{where}.{kind}")):
            _check_structure(item, f"{where}.{kind}[{index}]", tensor_count, depth + 1)
    else:
        raise ManifestSchemaError(f"{where} has the key {kind!r}; expected tensor, value, dict, list or tuple")


def _check_rank(record, rank: int, tp_degree: int) -> None:
    where = f"ranks[{rank}]"
    _check_object(record, where, required={"file", "sha256", "size", "collectives", "groups"})
    file = _check_type(record["file"], str, f"{where}.file")
    if not program_file_pattern(rank).match(file):
        raise ManifestSchemaError(
            f"{where}.file {file!r} is not tp_rank_{rank:02d}/model-<save_id>.pt2 (a file inside rank {rank}'s "
            "folder of the save; absolute paths and '..' are never read)"
        )
    if not _SHA256.match(_check_type(record["sha256"], str, f"{where}.sha256")):
        raise ManifestSchemaError(f"{where}.sha256 must be 64 lowercase hex digits")
    _check_int(record["size"], f"{where}.size", low=0, high=1 << 50)
    for op, groups in _check_type(record["collectives"], dict, f"{where}.collectives").items():
        names = _check_type(groups, list, f"{where}.collectives[{op!r}]")
        if not all(isinstance(name, str) for name in names):
            raise ManifestSchemaError(f"{where}.collectives[{op!r}] must list group names (strings)")
    for name, ranks in _check_type(record["groups"], dict, f"{where}.groups").items():
        members = _check_type(ranks, list, f"{where}.groups[{name!r}]")
        for index, member in enumerate(members):
            _check_int(member, f"{where}.groups[{name!r}][{index}]", low=0, high=tp_degree - 1)
        if members != sorted(set(members)) or not members:
            raise ManifestSchemaError(f"{where}.groups[{name!r}] must list distinct ranks in increasing order")


def _check_object(value, where: str, required: set[str], optional: set[str] = frozenset()) -> None:
    _check_type(value, dict, where)
    missing = sorted(required - value.keys())
    if missing:
        raise ManifestSchemaError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(value.keys() - required - optional)
    if unknown:
        raise ManifestSchemaError(f"{where} has unknown field(s) {', '.join(map(repr, unknown))}")


def _check_type(value, kind: type, where: str):
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        expected = {dict: "an object", list: "a list", str: "a string"}.get(kind, kind.__name__)
        raise ManifestSchemaError(f"{where} must be {expected}, got {_describe(value)}")
    return value


def _check_int(value, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestSchemaError(f"{where} must be an integer from {low} to {high}, got {_describe(value)}")
    return value


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"

"""Check a traced rank's `.pt2` archive before torch reads it, so that loading never runs its content.

`torch.export.load` runs code from an archive on several paths: it unpickles
`use_pickle` weights and constants, `opaque_obj_*` and `custom_obj_*` constants
(whatever their config says), legacy `.pt` state files and the sample inputs
(`torch.load(weights_only=False)` as a fallback), evaluates symbolic shape
expressions with `sympy.sympify`, `exec`s `guards_code` when the program is
turned into a module, calls any `torch.*` function a graph node names, loads
AOTInductor shared libraries, and falls back to an older format whose files are
pickles. `check_program_archive` therefore accepts only what
`parallel_model_save` writes and refuses everything else: an allowlist, not a
list of known bad members.

    <root>/archive_format, archive_version, byteorder, .data/version, .data/serialization_id
    <root>/models/model.json                          the graph (JSON), checked below
    <root>/data/weights/model_weights_config.json     every entry raw (use_pickle false), weight_<n>
    <root>/data/constants/model_constants_config.json every entry raw, tensor_<n>
    <root>/data/weights/weight_<n>, data/constants/tensor_<n>   raw tensor bytes
    <root>/data/sample_inputs/model.pt                must be empty

Every member must be stored uncompressed (no member expands beyond the file's
size). In the graph: every node calls an operator of an allowed namespace
(aten, prims, nxd, c10d), no symbolic expression, no custom object, no guards code.
"""

from __future__ import annotations

import io
import json
import re
import zipfile

from ..errors import TracedModelCorruptError, UnsafeTracedModelError

_METADATA = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_GRAPH = "models/model.json"
_WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
_CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_PAYLOAD = re.compile(r"^data/(weights/weight|constants/tensor)_\d+$")
_PAYLOAD_PREFIX = {_WEIGHTS_CONFIG: "weight_", _CONSTANTS_CONFIG: "tensor_"}
_PAYLOAD_DIR = {_WEIGHTS_CONFIG: "data/weights/", _CONSTANTS_CONFIG: "data/constants/"}
_MAX_JSON_BYTES = 1 << 30
# Graph node targets that may run: operators (resolved through torch.ops, never a plain torch.* function)
# of namespaces that hold tensor math and collectives, and tuple indexing of multi-output operators.
_ALLOWED_TARGET = re.compile(
    r"^(torch\.ops\.(aten|prims|nxd|_c10d_functional|c10d_functional)\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*"
    r"|torch\.ops\.higher_order\.(wrap_with_set_grad_enabled|wrap_with_autocast)"
    r"|_operator\.getitem)$"
)
# Graph fields whose strings torch evaluates as code, or that name torchbind classes.
_REFUSED_GRAPH_KEYS = {"expr_str": "a symbolic shape expression (evaluated with sympy.sympify)",
                       "as_custom_obj": "a custom (torchbind) object", "custom_obj": "a custom (torchbind) object",
                       "class_fqn": "a custom (torchbind) class"}


def check_program_archive(source: str | bytes, where: str) -> None:
    """Raise UnsafeTracedModelError (or TracedModelCorruptError) unless `source` is an archive loading can read safely.

    `source` is the archive's path or its bytes; `where` names it in messages.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            _check_archive(archive, where)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, KeyError, OSError, RecursionError,
            UnicodeDecodeError, NotImplementedError) as error:
        if isinstance(error, TracedModelCorruptError):
            raise
        raise TracedModelCorruptError(
            f"{where} is not a readable torch.export archive ({type(error).__name__}: {error}); the file is damaged. "
            "Save the model again with parallel_model_save."
        ) from error


def _refuse(where: str, what: str) -> UnsafeTracedModelError:
    return UnsafeTracedModelError(
        f"{where} holds {what}, which torch would run as code while loading; parallel_model_load never loads such "
        "an archive. parallel_model_save writes graphs as JSON and tensors as raw bytes only: load a traced model "
        "only from a folder that it wrote, or trace and save the model again."
    )


def _check_archive(archive: zipfile.ZipFile, where: str) -> None:
    infos = archive.infolist()
    if not infos:
        raise TracedModelCorruptError(f"{where} is an empty archive; save the model again.")
    root = infos[0].filename.split("/", 1)[0]
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        prefix, _, name = info.filename.partition("/")
        if prefix != root or not name:
            raise _refuse(where, f"the member {info.filename!r} outside the archive's folder {root!r}")
        if name in members:
            raise _refuse(where, f"the member {info.filename!r} twice")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise TracedModelCorruptError(
                f"{where} has the compressed member {info.filename!r}; torch.export.save stores members "
                "uncompressed. Save the model again."
            )
        if not (name in _METADATA or name in (_GRAPH, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, _SAMPLE_INPUTS)
                or _PAYLOAD.match(name)):
            raise _refuse(where, f"the member {info.filename!r} (only the graph, raw tensors and their configs are read)")
        members[name] = info
    _check_layout(archive, infos, where)
    for required in (_GRAPH, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, "archive_version"):
        if required not in members:
            raise TracedModelCorruptError(f"{where} lacks {root}/{required}; save the model again.")
    if _SAMPLE_INPUTS in members and members[_SAMPLE_INPUTS].file_size:
        raise _refuse(where, f"pickled sample inputs ({root}/{_SAMPLE_INPUTS}, loaded with torch.load)")
    referenced = set()
    for config_name in (_WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
        referenced |= _check_payload_config(_read_json(archive, members[config_name], where), config_name, root, where)
    unreferenced = sorted(name for name in members if _PAYLOAD.match(name) and name not in referenced)
    if unreferenced:
        raise TracedModelCorruptError(f"{where} holds tensor files that no config names ({unreferenced[:3]}); save again.")
    missing = sorted(referenced - members.keys())
    if missing:
        raise TracedModelCorruptError(f"{where} lacks the tensor files {missing[:3]} that its configs name; save again.")
    _check_graph(_read_json(archive, members[_GRAPH], where), where)


def _check_layout(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], where: str) -> None:
    """Every member's local header agrees with the directory and no two members overlap.

    torch reads the archive with its own zip reader; a file that two readers could
    see differently (overlapping or mislabelled members) is refused.
    """
    end = 0
    for info in sorted(infos, key=lambda info: info.header_offset):
        if info.header_offset < end:
            raise _refuse(where, f"overlapping members ({info.filename!r})")
        with archive.open(info):  # reads and checks the member's local header
            pass
        end = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str):
    if info.file_size > _MAX_JSON_BYTES:
        raise TracedModelCorruptError(f"{where}: {info.filename} is {info.file_size} bytes, too large for a graph.")
    try:
        return json.loads(archive.read(info))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise TracedModelCorruptError(f"{where}: {info.filename} is not valid JSON ({error}); save the model again.") from error


def _check_payload_config(config, config_name: str, root: str, where: str) -> set[str]:
    """Check that every entry is a raw tensor in a file of the config's folder; return those files."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise TracedModelCorruptError(f"{where}: {root}/{config_name} has no config object; save the model again.")
    files = set()
    for fqn, entry in entries.items():
        if not isinstance(entry, dict):
            raise TracedModelCorruptError(f"{where}: {root}/{config_name} entry {fqn!r} is not an object; save again.")
        path_name = entry.get("path_name")
        if entry.get("use_pickle") is not False:
            raise _refuse(where, f"the pickled entry {fqn!r} in {root}/{config_name} (use_pickle is not false)")
        if not isinstance(path_name, str) or not re.fullmatch(rf"{_PAYLOAD_PREFIX[config_name]}\d+", path_name):
            raise _refuse(where, f"the entry {fqn!r} stored as {path_name!r} in {root}/{config_name} "
                                 f"(only raw tensors named {_PAYLOAD_PREFIX[config_name]}<n> are read)")
        if not isinstance(entry.get("tensor_meta"), dict):
            raise TracedModelCorruptError(f"{where}: {root}/{config_name} entry {fqn!r} lacks tensor_meta; save again.")
        files.add(_PAYLOAD_DIR[config_name] + path_name)
    return files


def _check_graph(graph, where: str) -> None:
    if not isinstance(graph, dict) or not isinstance(graph.get("graph_module"), dict):
        raise TracedModelCorruptError(f"{where}: the graph has no graph_module; save the model again.")
    if graph.get("guards_code"):
        raise _refuse(where, "guards code (Python source that torch executes when it builds the module)")
    pending = [graph]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _REFUSED_GRAPH_KEYS and value not in (None, {}, []):
                    raise _refuse(where, _REFUSED_GRAPH_KEYS[key])
                if key == "target" and isinstance(value, str) and not _ALLOWED_TARGET.match(value):
                    raise _refuse(where, f"a graph node calling {value!r} (only tensor operators are allowed)")
                pending.append(value)

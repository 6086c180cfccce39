"""Fuzz the traced-model readers that run before any worker starts (and the worker's own read).

Mutated traced_model.json (JSON edits and raw bytes) through `read_manifest`,
and mutated `.pt2` archives (truncated, bit-flipped, garbage or extra members)
through the caller's check and the worker's read-and-load: every input either
loads or raises a NeuronxDistributedError; none runs the marker pickle planted
in it. Deterministic (derandomize) and bounded (max_examples), no workers.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fuzzing import bit_flipped, truncated
from test_trace_safety import HOSTILE, _CreatesMarker, _hostile, manifest_for, tiny_archive, write_folder

from neuronx_distributed.errors import NeuronxDistributedError
from neuronx_distributed.trace.artifact import MANIFEST_NAME, read_manifest, read_rank_file
from neuronx_distributed.trace.jobs import load_program

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ARCHIVE = tiny_archive()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every (container, key) position in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


def _apply(manifest: dict, path: tuple, action: str, value):
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if action == "delete":
        del node[path[-1]]
    else:
        node[path[-1]] = value


def _read_folder(folder) -> None:
    """Run what parallel_model_load runs before and in a worker, short of starting one."""
    manifest = read_manifest(folder)
    for record in manifest.ranks:
        load_program(read_rank_file(folder, record), record.file)  # only for an archive that passed every check


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_fields(data, tmp_path_factory):
    folder = write_folder(tmp_path_factory.mktemp("fuzz"), ARCHIVE)
    manifest = manifest_for(ARCHIVE)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(manifest))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        _apply(manifest, path, data.draw(st.sampled_from(["delete", "replace"])), data.draw(JSON_VALUES))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    try:
        read_manifest(folder)
    except NeuronxDistributedError:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(data, tmp_path_factory):
    folder = write_folder(tmp_path_factory.mktemp("fuzz"), ARCHIVE)
    text = json.dumps(manifest_for(ARCHIVE)).encode()
    kind = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if kind == "truncate":
        text = truncated(data.draw, text)
    elif kind == "flip":
        text = bit_flipped(data.draw, text, max_flips=8)
    else:
        text = data.draw(st.binary(max_size=200))
    (folder / MANIFEST_NAME).write_bytes(text)
    try:
        read_manifest(folder)
    except NeuronxDistributedError:
        pass


def _with_marker_member(archive: bytes, marker: str, name: str) -> bytes:
    """The archive plus a pickle (that would create `marker`) stored under `name`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        root = source.infolist()[0].filename.split("/")[0]
        target.writestr(f"{root}/{name}", pickle.dumps(_CreatesMarker(marker)))
    return buffer.getvalue()


@FUZZ
@given(data=st.data())
def test_fuzz_program_archive(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    marker = folder / "marker"
    archive = bytearray(ARCHIVE)
    kind = data.draw(st.sampled_from(["truncate", "flip", "garbage", "member", "hostile"]))
    if kind == "truncate":
        archive = bytearray(truncated(data.draw, archive))
    elif kind == "flip":
        archive = bytearray(bit_flipped(data.draw, archive, max_flips=16))
    elif kind == "garbage":
        start = data.draw(st.integers(0, len(archive) - 1))
        garbage = data.draw(st.binary(min_size=1, max_size=64))
        archive[start : start + len(garbage)] = garbage
    elif kind == "hostile":  # one of the archives that torch.export.load would run code from
        archive = bytearray(_hostile(ARCHIVE, data.draw(st.sampled_from(list(HOSTILE))), marker))
    else:
        name = data.draw(st.sampled_from([
            "data/constants/opaque_obj_0", "data/constants/custom_obj_0", "data/weights/model.pt",
            "data/constants/model.pt", "data/weights/weight_99", "models/other.json", "extra/x",
            "data/aotinductor/model/x.so", "data/constants/tensor_7",
        ]))
        archive = bytearray(_with_marker_member(ARCHIVE, str(marker), name))
    archive = bytes(archive)
    write_folder(folder, archive)  # the manifest matches the mutated file: only the archive checks stand in the way
    try:
        _read_folder(folder)
    except NeuronxDistributedError:
        pass
    assert not marker.exists()

"""Fuzzing the checkpoint reading layer: every malformed manifest or shard file raises our typed error.

Bounded and deterministic (hypothesis, derandomized). The manifest parser gets a
valid manifest with one field replaced, removed or added, and damaged text; the
shard file reader gets a real shard file truncated, bit-flipped, overwritten,
with a mutated header, or replaced by garbage, with the manifest's size and
checksum updated to match (so the header checks are reached, not only the
checksum). Each example reads through the same single-process path that a load
takes on every rank; nothing may escape but a NeuronxDistributedError.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from fuzzing import bit_flipped, truncated

from neuronx_distributed.errors import NeuronxDistributedError
from neuronx_distributed.parallel_layers import checkpoint_format as fmt
from neuronx_distributed.parallel_layers import load, save
from neuronx_distributed.parallel_layers.checkpoint_tools import verify

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def _valid_manifest() -> dict:
    """A TP=2 manifest with every layout, as `save` writes it."""
    save_id = "0123abcd"
    files = [fmt.FileEntry(fmt.shard_file_path(rank, save_id), 1000 + rank, f"{rank:08x}",
                           {"model/fc.weight": f"{rank + 10:08x}", "model/norm.weight": "0000abcd"}) for rank in range(2)]
    tensors = {
        "model/fc.weight": fmt.TensorEntry([8, 4], "float32", fmt.SHARDED, 0, 1),
        "model/qkv.weight": fmt.TensorEntry([12, 4], "bfloat16", fmt.SHARDED, 0, 3),
        "model/norm.weight": fmt.TensorEntry([4], "float32", fmt.REPLICATED),
        "optimizer/state/0/step": fmt.TensorEntry([], "int64", fmt.LOCAL),
    }
    return json.loads(fmt.Manifest(2, save_id, "model", files, tensors).to_json())


def _paths(value, prefix=()):
    """Every (path, value) in a JSON tree, the root included."""
    yield prefix, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _paths(item, (*prefix, key))


@st.composite
def mutated_json(draw, base):
    """`base` (a JSON tree, copied) with one node replaced, one dict key removed, or one key added."""
    tree = json.loads(json.dumps(base))
    paths = list(_paths(tree))
    path, node = paths[draw(st.integers(0, len(paths) - 1))]
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "replace" or not path and action == "remove":
        new = draw(JSON_VALUES)
        if not path:
            return new
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = new
    elif action == "remove" and isinstance(node, dict) and node:
        del node[draw(st.sampled_from(sorted(node)))]
    elif isinstance(node, dict):
        node[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    elif isinstance(node, list):
        node.append(draw(JSON_VALUES))
    return tree


def _check_parsed(manifest: fmt.Manifest) -> None:
    """What an accepted manifest guarantees to its readers."""
    assert manifest.tensor_parallel_size >= 1 and len(manifest.files) == manifest.tensor_parallel_size
    for rank, entry in enumerate(manifest.files):
        assert entry.path == fmt.shard_file_path(rank, manifest.save_id) and entry.bytes >= 8
    for entry in manifest.tensors.values():
        assert entry.nbytes >= 0
        if entry.layout == fmt.SHARDED:
            assert 0 <= entry.partition_dim < len(entry.shape)


@FUZZ
@given(mutated_json(_valid_manifest()))
def test_manifest_parser_with_mutated_fields(raw):
    try:
        manifest = fmt.Manifest.from_json(json.dumps(raw))
    except NeuronxDistributedError:
        event("refused")
        return
    event("accepted")
    _check_parsed(manifest)


@FUZZ
@given(st.data())
def test_manifest_parser_with_damaged_text(data):
    text = fmt.Manifest.from_json(json.dumps(_valid_manifest())).to_json().encode()
    kind = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if kind == "truncate":
        text = truncated(data.draw, text)
    elif kind == "flip":
        text = bit_flipped(data.draw, text, max_flips=4)
    else:
        text = data.draw(st.binary(max_size=200))
    try:
        manifest = fmt.Manifest.from_json(text)
    except NeuronxDistributedError:
        return
    _check_parsed(manifest)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, shard file path, its original bytes, the original manifest JSON) of a single-process checkpoint."""
    folder = str(tmp_path_factory.mktemp("fuzz") / "ckpt")
    torch.manual_seed(0)
    save({"model": {"fc.weight": torch.randn(4, 3), "norm.bias": torch.zeros(3, dtype=torch.bfloat16)},
          "step": torch.tensor(7), "history": [1.5, (2, None), {"k": float("inf")}], "mask": torch.tensor([True, False])},
         folder)
    manifest = fmt.read_manifest(folder)
    shard = os.path.join(folder, manifest.files[0].path)
    with open(shard, "rb") as file:
        original = file.read()
    with open(os.path.join(folder, fmt.MANIFEST_NAME)) as file:
        manifest_text = file.read()
    return folder, shard, original, manifest_text


def _with_header(original: bytes, header) -> bytes:
    """`original` with its safetensors header replaced by `header` (JSON), the data after it kept."""
    (length,) = struct.unpack("<Q", original[:8])
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + original[8 + length:]


@st.composite
def damaged_shard(draw, original: bytes):
    (length,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8: 8 + length])
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "header", "structure", "garbage"]))
    data = bytearray(original)
    if kind == "truncate":
        return truncated(draw, original)
    if kind == "flip":  # mostly in the length prefix and the header, where the parsing is
        return bit_flipped(draw, original, max_flips=3, within=8 + length + 16)
    if kind == "overwrite":
        start = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=32))
        data[start: start + len(chunk)] = chunk
        return bytes(data[: len(original)])
    if kind == "header":
        return _with_header(original, draw(mutated_json(header)))
    if kind == "structure":
        structure = json.loads(header["__metadata__"][fmt.STRUCTURE_KEY])
        changed = dict(header, __metadata__={**header["__metadata__"],
                                             fmt.STRUCTURE_KEY: json.dumps(draw(mutated_json(structure)))})
        return _with_header(original, changed)
    return draw(st.binary(max_size=300))


@FUZZ
@given(data=st.data())
def test_shard_reader_with_damaged_files(checkpoint, data):
    folder, shard, original, manifest_text = checkpoint
    damaged = data.draw(damaged_shard(original))
    record_checksum = data.draw(st.booleans())
    with open(shard, "wb") as file:
        file.write(damaged)
    raw = json.loads(manifest_text)
    if record_checksum:  # as a forger would: the header checks must stand on their own
        crc, size = fmt.checksum_file(shard)
        raw["files"][0].update(bytes=max(size, 8), crc32=crc)
        with contextlib.suppress(NeuronxDistributedError):  # each tensor's too, where the header still says where
            raw["files"][0]["crc32"], raw["files"][0]["tensor_crc32"] = fmt.checksum_tensors(shard)
    with open(os.path.join(folder, fmt.MANIFEST_NAME), "w") as file:
        json.dump(raw, file)
    for read in (lambda: load(folder), lambda: load(folder, verify=False), lambda: verify(folder)):
        try:
            read()
            event("read")
        except NeuronxDistributedError as error:
            event(type(error).__name__)

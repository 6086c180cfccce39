"""Offline operations on a sharded checkpoint, without a process group: verify, merge, reshard.

`merge` writes the model's full tensors as a Hugging Face style folder
(`model.safetensors`, or numbered files and `model.safetensors.index.json`
above `max_shard_bytes`) that `load(..., sharded=False)` and transformers'
`from_pretrained` read. `reshard` writes the whole checkpoint (model, optimizer
and everything else) at another TP degree; `reshard(..., 1)` is the complete
unsharded checkpoint in our format.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from functools import partial

from safetensors.torch import save_file
from tqdm import tqdm

from ..durable import fsync_path
from ..errors import CheckpointKeyError
from . import checkpoint_format as fmt
from .sharded_source import ShardedSource
from .state_tree import TensorRef, decode

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_MERGED_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$")


def verify(load_dir: str, progress: bool = False) -> fmt.Manifest:
    """Check every shard file against the manifest's checksums; return the manifest."""
    manifest = fmt.read_manifest(load_dir)
    with tqdm(total=sum(f.bytes for f in manifest.files), unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for entry in manifest.files:
            fmt.verify_file(load_dir, entry, bar.update)
    return manifest


def model_tensor_names(load_dir: str, manifest: fmt.Manifest, model_key: str | None) -> dict[str, str]:
    """Model state-dict key -> tensor name, from TP rank 0's structure."""
    tree = decode(fmt.read_structure(load_dir, manifest.files[0]), TensorRef)
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


def merge(load_dir: str, out_dir: str, model_key: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          progress: bool = False) -> list[str]:
    """Write the model's unsharded tensors to `out_dir`; return the files written.

    Every file is written aside and renamed into place once all are complete, so a
    failed merge leaves an earlier merge in `out_dir` as it was; a finished one
    replaces it, deleting its files that the new one does not have.
    """
    manifest = verify(load_dir, progress)
    names = model_tensor_names(load_dir, manifest, model_key)
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
    os.makedirs(out_dir, exist_ok=True)
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors" for index in range(len(groups))
    ]
    written = []
    try:
        with tqdm(total=len(names), unit="tensor", desc="merge", disable=not progress) as bar:
            for file_name, keys in zip(files, groups):
                tensors = {}
                for key in keys:
                    tensors[key] = source.read(names[key])
                    bar.update()
                written.append(_write_aside(os.path.join(out_dir, file_name), partial(save_file, tensors, metadata={"format": "pt"})))
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(manifest.tensors[name].nbytes for name in names.values())},
                "weight_map": {key: file_name for file_name, keys in zip(files, groups) for key in keys},
            }
            files.append("model.safetensors.index.json")
            written.append(_write_aside(os.path.join(out_dir, files[-1]), partial(_write_json, value=index)))
    except BaseException:
        for aside in written:
            os.remove(aside)
        raise
    _publish(out_dir, written)
    return files


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
    """Write the whole checkpoint at `load_dir` to `out_dir` at TP degree `tensor_parallel_size` (atomically)."""
    manifest = verify(load_dir, progress)
    sources = [ShardedSource(load_dir, manifest, rank, tensor_parallel_size) for rank in range(tensor_parallel_size)]
    for source in sources:  # every error before the first byte is written
        source.check_loadable(source.names())
    save_id = uuid.uuid4().hex
    files, entries = [], {}
    with tqdm(total=sum(len(s.names()) for s in sources), unit="tensor", desc="reshard", disable=not progress) as bar:
        for rank, source in enumerate(sources):
            tensors = {}
            for name in source.names():
                tensors[name] = source.read(name)
                entries[name] = manifest.tensors[name]
                bar.update()
            files.append(fmt.write_shard_file(out_dir, rank, save_id, tensors, source.structure))
    resharded = fmt.Manifest(tensor_parallel_size, save_id, manifest.model_key, files, entries)
    fmt.write_manifest(out_dir, resharded)
    fmt.remove_stale(out_dir, resharded)
    return resharded


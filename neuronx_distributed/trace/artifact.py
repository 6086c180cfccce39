"""The on-disk layout of a saved traced model.

    save_dir/
      traced_model.json     the manifest: TP degree, inputs, outputs, and per rank its
                            file, sha256, size, collectives and process groups
      tp_rank_00/model.pt2  rank 0's program (torch.export.save: JSON graph, raw weights)
      tp_rank_01/model.pt2  ...

Loading never unpickles: `read_manifest` checks every shard's sha256 against the
manifest and refuses archives with pickled members (torch.export.load would unpickle them).
A save is written in a sibling folder and renamed into place, the manifest
written last, so `save_dir` holds either the previous model or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TracedModelCorruptError, TracedModelNotFoundError, TracedModelSaveError
from .signature import InputSignature, OutputLayout

MANIFEST_NAME = "traced_model.json"
PROGRAM_NAME = "model.pt2"
FORMAT = "neuronx_distributed.traced_model"
FORMAT_VERSION = 1


def rank_program_path(save_dir: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank`'s program lives under `save_dir`."""
    return Path(save_dir) / f"tp_rank_{rank:02d}" / PROGRAM_NAME


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RankRecord:
    """One rank's program file and the collectives it runs."""

    sha256: str
    size: int
    collectives: dict[str, list[str]]
    groups: dict[str, list[int]]


@dataclass(frozen=True)
class Manifest:
    tp_degree: int
    inputs: InputSignature
    outputs: OutputLayout
    ranks: tuple[RankRecord, ...]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "torch_version": torch.__version__,
            "tp_degree": self.tp_degree,
            "inputs": self.inputs.to_json(),
            "outputs": self.outputs.to_json(),
            "ranks": [
                {
                    "file": str(rank_program_path("", rank)),
                    "sha256": record.sha256,
                    "size": record.size,
                    "collectives": record.collectives,
                    "groups": record.groups,
                }
                for rank, record in enumerate(self.ranks)
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return cls(
            tp_degree=int(data["tp_degree"]),
            inputs=InputSignature.from_json(data["inputs"]),
            outputs=OutputLayout.from_json(data["outputs"]),
            ranks=tuple(
                RankRecord(rank["sha256"], int(rank["size"]), rank["collectives"], rank["groups"])
                for rank in data["ranks"]
            ),
        )


def read_manifest(load_dir: str | os.PathLike) -> Manifest:
    """The manifest at `load_dir`, after checking that every rank's file is there and unchanged."""
    path = Path(load_dir) / MANIFEST_NAME
    if not path.is_file():
        raise TracedModelNotFoundError(
            f"no traced model at {str(load_dir)!r} (no {MANIFEST_NAME}); pass the folder that "
            "parallel_model_save wrote."
        )
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r} version {data.get('format_version')!r}")
        manifest = Manifest.from_json(data)
        if len(manifest.ranks) != manifest.tp_degree:
            raise ValueError(f"{len(manifest.ranks)} rank entries for tp_degree {manifest.tp_degree}")
    except (ValueError, KeyError, TypeError) as error:
        raise TracedModelCorruptError(
            f"cannot read the manifest {str(path)!r} ({error}); it was not written by this version's "
            "parallel_model_save, or it was edited. Trace and save the model again."
        ) from error
    for rank, record in enumerate(manifest.ranks):
        _verify(rank_program_path(load_dir, rank), record)
    return manifest


def _verify(path: Path, record: RankRecord) -> None:
    if not path.is_file():
        raise TracedModelNotFoundError(f"the traced model's shard file {str(path)!r} is missing; save the model again.")
    if path.stat().st_size != record.size or file_sha256(path) != record.sha256:
        raise TracedModelCorruptError(
            f"{str(path)!r} differs from the manifest (size or sha256); the file was changed or truncated. "
            "Save the model again."
        )
    pickled = _pickled_members(path)
    if pickled:
        raise TracedModelCorruptError(
            f"{str(path)!r} holds pickled data ({', '.join(pickled[:3])}), which parallel_model_load never "
            "unpickles; parallel_model_save writes graphs as JSON and tensors as raw bytes. Save the model again."
        )


def _pickled_members(path: Path) -> list[str]:
    """Members of a torch.export archive that torch.export.load would unpickle: .pt files, use_pickle payloads."""
    try:
        with zipfile.ZipFile(path) as archive:
            found = [info.filename for info in archive.infolist() if info.filename.endswith(".pt") and info.file_size]
            for name in archive.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    found += [f"{name}:{key}" for key, entry in config.items() if entry.get("use_pickle")]
    except (zipfile.BadZipFile, ValueError) as error:
        raise TracedModelCorruptError(f"{str(path)!r} is not a torch.export archive ({error}); save the model again.") from error
    return found


class StagedSave:
    """A sibling folder that becomes `save_dir` in one rename once the manifest is written."""

    def __init__(self, save_dir: str | os.PathLike):
        self.target = Path(save_dir).absolute()
        if self.target.exists() and not _replaceable(self.target):
            raise TracedModelSaveError(
                f"{str(save_dir)!r} exists and is not a traced model; choose another save_dir or remove it."
            )
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.folder = self.target.parent / f".{self.target.name}.partial-{secrets.token_hex(4)}"
        self.folder.mkdir()

    def publish(self, manifest: Manifest) -> None:
        """Write the manifest, then replace `save_dir` with the staged folder."""
        (self.folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1))
        previous = None
        if self.target.exists():
            previous = self.target.parent / f".{self.target.name}.old-{secrets.token_hex(4)}"
            self.target.rename(previous)
        self.folder.rename(self.target)
        if previous is not None:
            shutil.rmtree(previous)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _replaceable(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST_NAME).is_file() or not any(path.iterdir()))

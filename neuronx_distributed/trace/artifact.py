"""The on-disk layout of a saved traced model.

    save_dir/
      traced_model.json                the manifest: TP degree, inputs, outputs, and per
                                       rank its file, sha256, size, collectives and groups
      tp_rank_00/model-<save_id>.pt2   rank 0's program (torch.export.save: JSON graph, raw weights)
      tp_rank_01/model-<save_id>.pt2   ...

Loading never unpickles: `read_manifest` checks every shard's sha256 against the
manifest and refuses archives with pickled members (torch.export.load would unpickle them).
A save writes its files under a fresh save_id beside the previous save's, fsyncs
them, and then renames its manifest over the previous one: `save_dir` loads the
previous model until that rename and the complete new one after it, even after a
crash or power loss. Only then are the previous save's files deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..durable import replace_with_text
from ..errors import TracedModelCorruptError, TracedModelNotFoundError, TracedModelSaveError
from .signature import InputSignature, OutputLayout

MANIFEST_NAME = "traced_model.json"
FORMAT = "neuronx_distributed.traced_model"
FORMAT_VERSION = 1


_RANK_FOLDER = re.compile(r"^tp_rank_(\d+)$")
_PROGRAM_FILE = re.compile(r"^model(-[0-9a-f]+)?\.pt2$")


def rank_program_file(rank: int, save_id: str) -> str:
    """Rank `rank`'s program file of save `save_id`, relative to the save folder."""
    return f"tp_rank_{rank:02d}/model-{save_id}.pt2"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RankRecord:
    """One rank's program file (relative to the save folder; "" before saving) and the collectives it runs."""

    file: str
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
                    "file": record.file,
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
                RankRecord(_program_file(rank["file"], index), rank["sha256"], int(rank["size"]), rank["collectives"], rank["groups"])
                for index, rank in enumerate(data["ranks"])
            ),
        )


def _program_file(file: str, rank: int) -> str:
    """`file` if it names a program file in rank `rank`'s folder (nothing outside the save folder)."""
    folder, _, name = file.partition("/")
    if folder != f"tp_rank_{rank:02d}" or not _PROGRAM_FILE.match(name):
        raise ValueError(f"rank {rank}'s file {file!r} is not tp_rank_{rank:02d}/model-<save_id>.pt2")
    return file


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
    for record in manifest.ranks:
        _verify(Path(load_dir) / record.file, record)
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
    """A save into `save_dir` that replaces the traced model there only once it is complete.

    The workers write `rank_program_file(rank, save_id)` and fsync it; `publish`
    renames the manifest into place, then deletes the previous save's files;
    `discard` deletes this save's files.
    """

    def __init__(self, save_dir: str | os.PathLike):
        self.target = Path(save_dir).absolute()
        if self.target.exists() and not _replaceable(self.target):
            raise TracedModelSaveError(
                f"{str(save_dir)!r} exists and is not a traced model; choose another save_dir or remove it."
            )
        self.created = not self.target.exists()
        self.target.mkdir(parents=True, exist_ok=True)
        self.save_id = secrets.token_hex(8)

    def publish(self, manifest: Manifest) -> None:
        """Make `manifest` (whose files this save wrote) the one that loads, then delete what it replaced."""
        final = self.target / MANIFEST_NAME
        replace_with_text(final, json.dumps(manifest.to_json(), indent=1), self.target / f"{MANIFEST_NAME}.{self.save_id}.tmp")
        self._remove_program_files(keep={record.file for record in manifest.ranks})
        for path in self.target.iterdir():
            if _is_unfinished_save_file(path.name):
                path.unlink()

    def discard(self) -> None:
        """Delete the files this save wrote (and `save_dir` if this save created it); the previous save stays as it was."""
        self._remove_program_files(keep=None)
        if self.created and not any(self.target.iterdir()):
            self.target.rmdir()

    def _remove_program_files(self, keep: set[str] | None) -> None:
        """Delete the program files not in `keep` (None: only this save's), then the rank folders left empty."""
        for folder in self.target.iterdir():
            if not (_RANK_FOLDER.match(folder.name) and folder.is_dir()):
                continue
            for path in folder.iterdir():
                relative = f"{folder.name}/{path.name}"
                ours = path.name == f"model-{self.save_id}.pt2"
                if _PROGRAM_FILE.match(path.name) and (ours if keep is None else relative not in keep):
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def _is_unfinished_save_file(name: str) -> bool:
    return name.startswith(MANIFEST_NAME + ".") and name.endswith(".tmp")


def _replaceable(path: Path) -> bool:
    """Whether a save may write into `path`: a traced model, an empty folder, or what an unfinished save left."""
    if not path.is_dir():
        return False
    if (path / MANIFEST_NAME).is_file():
        return True
    return all(_RANK_FOLDER.match(entry.name) or _is_unfinished_save_file(entry.name) for entry in path.iterdir())

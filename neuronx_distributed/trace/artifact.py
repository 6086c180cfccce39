"""The on-disk layout of a saved traced model.

    save_dir/
      traced_model.json                the manifest: TP degree, inputs, outputs, and per
                                       rank its file, sha256, size, collectives and groups
      tp_rank_00/model-<save_id>.pt2   rank 0's program (torch.export.save: JSON graph, raw weights)
      tp_rank_01/model-<save_id>.pt2   ...

Loading never runs what a file holds: the manifest is checked against
`manifest_schema`, every rank's file must be a regular file inside its rank
folder of exactly the recorded size and sha256, and its archive must pass
`program_archive.check_program_archive` (no pickles, no code), both by the caller
before any worker starts and by each worker on the bytes it then hands to torch.
A save writes its files under a fresh save_id beside the previous save's, fsyncs
them, and then renames its manifest over the previous one: `save_dir` loads the
previous model until that rename and the complete new one after it, even after a
crash or power loss. Only then are the previous save's files deleted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from ..durable import replace_with_text
from ..errors import TracedModelCorruptError, TracedModelNotFoundError, TracedModelSaveError
from ..parallel_layers.checkpoint_format import MANIFEST_NAME as CHECKPOINT_MANIFEST_NAME
from .manifest_schema import FORMAT, FORMAT_VERSION, check_manifest
from .program_archive import check_program_archive
from .signature import InputSignature, OutputLayout

MANIFEST_NAME = "traced_model.json"
MAX_MANIFEST_BYTES = 64 << 20


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
    io_aliases: dict[str, int]  # program state name -> output copied into it after each call

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "torch_version": torch.__version__,
            "tp_degree": self.tp_degree,
            "inputs": self.inputs.to_json(),
            "outputs": self.outputs.to_json(),
            "io_aliases": self.io_aliases,
            "ranks": [
                {
                    "file": record.file,
                    "sha256": record.sha256,
                    "size": record.size,
                    "collectives": record.collectives,
                    "groups": record.groups,
                }
                for record in self.ranks
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """The manifest in `data`, which `manifest_schema.check_manifest` accepted."""
        return cls(
            tp_degree=data["tp_degree"],
            inputs=InputSignature.from_json(data["inputs"]),
            outputs=OutputLayout.from_json(data["outputs"]),
            ranks=tuple(
                RankRecord(rank["file"], rank["sha256"], rank["size"], rank["collectives"], rank["groups"])
                for rank in data["ranks"]
            ),
            io_aliases=data.get("io_aliases", {}),
        )


def parse_manifest(text: bytes, where: str) -> Manifest:
    """The manifest in `text` (the bytes of a traced_model.json); TracedModelCorruptError says what is wrong."""
    try:
        data = json.loads(text)
        check_manifest(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, ManifestSchemaError
        raise TracedModelCorruptError(
            f"the manifest {where} is not a traced model of this version ({error}). It was edited, damaged or "
            "written by another version of parallel_model_save: trace and save the model again."
        ) from error
    return Manifest.from_json(data)


def read_manifest(load_dir: str | os.PathLike) -> Manifest:
    """The manifest at `load_dir`, after checking every rank's file: there, unchanged, and safe to load."""
    load_dir = Path(load_dir)
    path = load_dir / MANIFEST_NAME
    if not os.path.lexists(path):
        if (load_dir / CHECKPOINT_MANIFEST_NAME).is_file():
            raise TracedModelNotFoundError(
                f"{str(load_dir)!r} is a parallel_layers checkpoint (it has {CHECKPOINT_MANIFEST_NAME}), not a traced "
                "model; load it into a model with neuronx_distributed.parallel_layers.load, or pass the folder that "
                "parallel_model_save wrote."
            )
        raise TracedModelNotFoundError(
            f"no traced model at {str(load_dir)!r} (no {MANIFEST_NAME}); pass the folder that "
            "parallel_model_save wrote."
        )
    with open_regular_file(path, None, MAX_MANIFEST_BYTES) as file:
        manifest = parse_manifest(file.read(MAX_MANIFEST_BYTES + 1), repr(str(path)))
    for record in manifest.ranks:
        verify_rank_file(load_dir, record)
    return manifest


def open_regular_file(path: Path, size: int | None, max_size: int | None = None):
    """`path` opened for reading, if it is a regular file (not a symlink, FIFO or device) of `size` bytes.

    The checks run on the open descriptor, so no read can block or run past the
    size: a FIFO, a device file or a symlink is refused before anything is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as error:
        raise TracedModelNotFoundError(f"the traced model's file {str(path)!r} is missing; save the model again.") from error
    except OSError as error:
        why = ("it is a symlink; a traced model's files are regular files inside its folder, never symlinks. "
               "Save the model again" if error.errno == errno.ELOOP else f"{error.strerror}; check its permissions")
        raise TracedModelCorruptError(f"{str(path)!r} cannot be opened as a plain file: {why}.") from error
    file = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file (a FIFO, device or folder)"
    elif size is not None and info.st_size != size:
        problem = f"is {info.st_size} bytes, the manifest records {size}"
    elif max_size is not None and info.st_size > max_size:
        problem = f"is {info.st_size} bytes, more than a manifest can be ({max_size})"
    if problem:
        file.close()
        raise TracedModelCorruptError(f"{str(path)!r} {problem}; the traced model was changed or damaged. Save it again.")
    return file


def _rank_file_path(load_dir: Path, record: RankRecord) -> Path:
    folder = load_dir / record.file.split("/", 1)[0]
    if folder.is_symlink() or not folder.is_dir():
        raise TracedModelCorruptError(
            f"{str(folder)!r} is not a folder of the save (a symlink, or missing); a traced model's rank folders "
            "are plain folders inside it. Save the model again."
        )
    return load_dir / record.file


def verify_rank_file(load_dir: Path, record: RankRecord) -> None:
    """Check a rank's file against its record (size, sha256) and its archive's content, reading no further than its size."""
    path = _rank_file_path(load_dir, record)
    digest = hashlib.sha256()
    with open_regular_file(path, record.size) as file:
        remaining = record.size
        while remaining:
            block = file.read(min(remaining, 1 << 20))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
        _check_digest(path, digest.hexdigest(), record)
        file.seek(0)
        check_program_archive(file, repr(str(path)))


def read_rank_file(load_dir: Path, record: RankRecord) -> bytes:
    """A rank's file, read once into memory and checked (size, sha256, archive content): what torch may load."""
    path = _rank_file_path(load_dir, record)
    with open_regular_file(path, record.size) as file:
        data = file.read(record.size)
    _check_digest(path, hashlib.sha256(data).hexdigest(), record)
    check_program_archive(data, repr(str(path)))
    return data


def _check_digest(path: Path, sha256: str, record: RankRecord) -> None:
    if sha256 != record.sha256:
        raise TracedModelCorruptError(
            f"{str(path)!r} differs from the manifest (sha256); the file was changed or truncated. Save the model again."
        )


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

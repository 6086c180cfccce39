"""A traced-model folder is data: loading it must never run what it holds, and every bad folder gets a typed error.

Hostile archives carry, one kind per test, each path on which torch.export.load
would run code (a pickle whose __reduce__ creates a marker file, sympy
expressions, guards code, foreign graph targets, native libraries, the old
pickle-based format); each must raise UnsafeTracedModelError with the marker
never created. Where torch runs the payload itself, the test shows that too, so
the check cannot pass on a harmless payload. Malformed manifests and files that are
not plain files of the folder raise TracedModelCorruptError / TracedModelNotFoundError
naming what is wrong. Most cases fail before any worker starts; the few that need
workers use a one-layer model at TP=1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from neuronx_distributed.errors import (
    TracedModelCorruptError,
    TracedModelNotFoundError,
    UnsafeTracedModelError,
)
from neuronx_distributed.trace import parallel_model_load
from neuronx_distributed.trace.artifact import MANIFEST_NAME, read_manifest
from neuronx_distributed.trace.signature import InputSignature, OutputLayout, TensorSpec

IN, OUT, BATCH = 4, 3, 2
CHILD_TIMEOUT_S = 300


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(IN, OUT)
        self.register_buffer("offset", torch.arange(OUT, dtype=torch.float32))

    def forward(self, x):
        return (self.linear(x) + self.offset,)


def tiny_archive() -> bytes:
    """A tiny exported program as torch.export.save writes it (what a rank's file holds)."""
    program = torch.export.export(Tiny().eval(), (torch.zeros(BATCH, IN),), strict=False)
    program.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def manifest_for(archive: bytes, file: str = "tp_rank_00/model-0123abcd.pt2") -> dict:
    return {
        "format": "neuronx_distributed.traced_model",
        "format_version": 1,
        "torch_version": torch.__version__,
        "tp_degree": 1,
        "inputs": InputSignature((TensorSpec((BATCH, IN), torch.float32),), (), ()).to_json(),
        "outputs": OutputLayout((TensorSpec((BATCH, OUT), torch.float32),), {"tuple": [{"tensor": 0}]}).to_json(),
        "io_aliases": {},
        "ranks": [{"file": file, "sha256": hashlib.sha256(archive).hexdigest(), "size": len(archive),
                   "collectives": {}, "groups": {}}],
    }


def write_folder(folder: Path, archive: bytes, manifest: dict | None = None) -> Path:
    """A traced-model folder at TP=1 holding `archive`, with a manifest that matches it (unless given)."""
    manifest = manifest or manifest_for(archive)
    path = folder / manifest_for(archive)["ranks"][0]["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(archive)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def archive() -> bytes:
    return tiny_archive()


# ---- hostile archives ---------------------------------------------------------------------------------------


class _CreatesMarker:
    """Unpickling this creates the file at `path` (what a hostile pickle would do, harmlessly)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _members(archive: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        return {info.filename: zipped.read(info) for info in zipped.infolist()}


def _pack(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return buffer.getvalue()


def _root(members: dict) -> str:
    return next(iter(members)).split("/")[0]


def _edit_json(members: dict, name: str, edit) -> None:
    path = f"{_root(members)}/{name}"
    data = json.loads(members[path])
    edit(data)
    members[path] = json.dumps(data).encode()


def _raw_byte_meta(members: dict) -> dict:
    """A tensor_meta under which torch reads a member's bytes as a raw uint8 tensor (so it reaches the unpickler)."""
    config = json.loads(members[f"{_root(members)}/data/weights/model_weights_config.json"])["config"]
    return dict(config["linear.bias"]["tensor_meta"], dtype=1, requires_grad=False)  # 1: uint8


def _constant_object(prefix: str):
    def build(members: dict, payload: bytes) -> None:
        meta = _raw_byte_meta(members)
        _edit_json(members, "data/constants/model_constants_config.json", lambda config: config["config"].update(
            evil={"path_name": f"{prefix}_0", "is_param": False, "use_pickle": False, "tensor_meta": meta}))
        members[f"{_root(members)}/data/constants/{prefix}_0"] = payload
    return build


def _pickled_weight(members: dict, payload: bytes) -> None:
    _edit_json(members, "data/weights/model_weights_config.json",
               lambda config: config["config"]["linear.bias"].update(use_pickle=True))
    members[f"{_root(members)}/data/weights/weight_1"] = payload


def _pickled_constant(members: dict, payload: bytes) -> None:
    meta = _raw_byte_meta(members)
    _edit_json(members, "data/constants/model_constants_config.json", lambda config: config["config"].update(
        evil={"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": meta}))
    members[f"{_root(members)}/data/constants/tensor_0"] = payload


def _member(name: str):
    def build(members: dict, payload: bytes) -> None:
        members[f"{_root(members)}/{name}"] = payload
    return build


def _sympy_expression(marker: str):
    def build(members: dict, payload: bytes) -> None:
        def edit(graph):
            values = graph["graph_module"]["graph"]["tensor_values"]
            first = next(iter(values.values()))
            first["sizes"][0] = {"as_expr": {"expr_str": f"__import__('builtins').open({marker!r}, 'w').close() or {BATCH}",
                                             "hint": {"as_int": BATCH}}}
        _edit_json(members, "models/model.json", edit)
    return build


def _guards_code(marker: str):
    def build(members: dict, payload: bytes) -> None:
        _edit_json(members, "models/model.json",
                   lambda graph: graph.update(guards_code=[f"open({marker!r}, 'w') is not None"]))
    return build


def _foreign_target(members: dict, payload: bytes) -> None:
    def edit(graph):
        graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    _edit_json(members, "models/model.json", edit)


def _old_format(members: dict, payload: bytes) -> None:
    members.clear()  # torch.export.load falls back to this pickle-based layout when the new one fails
    members.update({"version": b"8.0", "serialized_exported_program.json": b"{}", "serialized_state_dict.json": payload})


# kind -> (how to build it, whether torch.export.load on its own runs the payload)
HOSTILE = {
    "opaque_obj constant declared use_pickle false": (_constant_object("opaque_obj"), True),
    "custom_obj (torchbind) constant": (_constant_object("custom_obj"), False),
    "use_pickle weight": (_pickled_weight, True),
    "use_pickle constant": (_pickled_constant, True),
    "legacy .pt weights member": (_member("data/weights/model.pt"), True),
    "legacy .pt constants member": (_member("data/constants/model.pt"), True),
    "pickled sample inputs": (_member("data/sample_inputs/model.pt"), True),
    "AOTInductor shared library": (_member("data/aotinductor/model/model.so"), False),
    "extra member": (_member("extra/notes.txt"), False),
    "sympy shape expression": ("sympy", True),
    "guards code": ("guards", False),
    "graph node calling a torch.* function": (_foreign_target, False),
    "old pickle-based format": (_old_format, False),
}


def _hostile(archive: bytes, kind: str, marker: Path) -> bytes:
    build, _ = HOSTILE[kind]
    build = {"sympy": _sympy_expression(str(marker)), "guards": _guards_code(str(marker))}.get(build, build)
    members = _members(archive)
    build(members, pickle.dumps(_CreatesMarker(str(marker))))
    return _pack(members)


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_load_refuses_archive_that_would_run_code(kind, archive, tmp_path):
    marker = tmp_path / "marker"
    hostile = _hostile(archive, kind, marker)
    folder = write_folder(tmp_path / "model", hostile)  # the manifest's sha256 and size match the hostile file
    with pytest.raises(UnsafeTracedModelError, match="never loads"):
        parallel_model_load(folder)
    assert not marker.exists()
    if HOSTILE[kind][1]:  # the payload is live: torch itself runs it
        try:
            torch.export.load(io.BytesIO(hostile))
        except Exception:  # noqa: BLE001 - what matters is whether the payload ran
            pass
        assert marker.exists(), f"torch.export.load did not run the {kind} payload; the test's payload is wrong"


def test_load_refuses_compressed_members(archive, tmp_path):
    folder = write_folder(tmp_path / "model", _pack(_members(archive), zipfile.ZIP_DEFLATED))
    with pytest.raises(TracedModelCorruptError, match="compressed"):
        parallel_model_load(folder)


def test_unmodified_archive_passes_the_checks(archive, tmp_path):
    folder = write_folder(tmp_path / "model", archive)
    manifest = read_manifest(folder)  # the checks that run before workers start
    assert manifest.tp_degree == 1 and manifest.ranks[0].size == len(archive)


# ---- malformed manifests -------------------------------------------------------------------------------------


def _set(path: str, value):
    def edit(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is KeyError:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


MALFORMED = {
    "tp_degree as a string": (_set("tp_degree", "2"), "tp_degree must be an integer"),
    "negative tp_degree": (_set("tp_degree", -1), "tp_degree must be an integer from 1"),
    "tp_degree as a bool": (_set("tp_degree", True), "tp_degree must be an integer"),
    "more ranks than tp_degree": (_set("tp_degree", 2), "ranks has 1 entries for tp_degree 2"),
    "missing inputs": (_set("inputs", KeyError), "lacks inputs"),
    "missing rank size": (_set("ranks.0.size", KeyError), r"ranks\[0\] lacks size"),
    "negative size": (_set("ranks.0.size", -5), r"ranks\[0\].size must be an integer from 0"),
    "size as a float": (_set("ranks.0.size", 10.0), r"ranks\[0\].size must be an integer"),
    "absolute path": (_set("ranks.0.file", "/etc/passwd"), r"ranks\[0\].file '/etc/passwd'"),
    "path with ..": (_set("ranks.0.file", "tp_rank_00/../../model.pt2"), r"ranks\[0\].file"),
    "another rank's folder": (_set("ranks.0.file", "tp_rank_01/model-0123abcd.pt2"), r"ranks\[0\].file"),
    "unknown dtype": (_set("inputs.positional.0.dtype", "load"), "is not a torch dtype"),
    "shape with a string": (_set("inputs.positional.0.shape", [2, "4"]), r"shape\[1\] must be an integer"),
    "ranks not a list": (_set("ranks", {"0": {}}), "ranks must be a list"),
    "output index out of range": (_set("outputs.structure", {"tuple": [{"tensor": 3}]}), r"tensor must be an integer from 0 to 0"),
    "unknown structure kind": (_set("outputs.structure", {"set": []}), "has the key 'set'"),
    "sha256 not hex": (_set("ranks.0.sha256", "x" * 64), "sha256 must be 64 lowercase hex"),
    "group rank out of range": (_set("ranks.0.groups", {"1": [0, 1]}), r"groups\['1'\]\[1\] must be an integer from 0 to 0"),
    "io_aliases to a missing output": (_set("io_aliases", {"model.offset": 1}), r"io_aliases\['model.offset'\]"),
    "wrong format": (_set("format", "something.else"), "format 'something.else'"),
    "unknown field": (_set("extra", 1), "unknown field"),
    "not an object": (lambda manifest: manifest.clear() or manifest.update(x=[]), "lacks"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifest_says_what_is_wrong(case, archive, tmp_path):
    edit, message = MALFORMED[case]
    manifest = manifest_for(archive)
    edit(manifest)
    folder = write_folder(tmp_path / "model", archive, manifest)
    with pytest.raises(TracedModelCorruptError, match=message) as raised:
        parallel_model_load(folder)
    assert "trace and save the model again" in str(raised.value)


@pytest.mark.parametrize("text", [b"", b"{", b"[1, 2]", b"\xff\xfe", b"[" * 100000 + b"]" * 100000, b"null"])
def test_unreadable_manifest_text(text, archive, tmp_path):
    folder = write_folder(tmp_path / "model", archive)
    (folder / MANIFEST_NAME).write_bytes(text)
    with pytest.raises(TracedModelCorruptError, match="not a traced model of this version"):
        parallel_model_load(folder)


# ---- files that are not plain files of the folder -----------------------------------------------------------


def _rank_file(folder: Path) -> Path:
    return folder / json.loads((folder / MANIFEST_NAME).read_text())["ranks"][0]["file"]


def test_rank_file_that_is_a_symlink_is_refused(archive, tmp_path):
    folder = write_folder(tmp_path / "model", archive)
    outside = tmp_path / "outside.pt2"
    outside.write_bytes(archive)
    _rank_file(folder).unlink()
    _rank_file(folder).symlink_to(outside)
    with pytest.raises(TracedModelCorruptError, match="never symlinks"):
        parallel_model_load(folder)


def test_rank_folder_that_is_a_symlink_is_refused(archive, tmp_path):
    folder = write_folder(tmp_path / "model", archive)
    elsewhere = tmp_path / "elsewhere"
    (folder / "tp_rank_00").rename(elsewhere)
    (folder / "tp_rank_00").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(TracedModelCorruptError, match="not a folder of the save"):
        parallel_model_load(folder)


def test_manifest_that_is_a_symlink_is_refused(archive, tmp_path):
    folder = write_folder(tmp_path / "model", archive)
    (folder / MANIFEST_NAME).rename(tmp_path / "real.json")
    (folder / MANIFEST_NAME).symlink_to(tmp_path / "real.json")
    with pytest.raises(TracedModelCorruptError, match="never symlinks"):
        parallel_model_load(folder)


@pytest.mark.parametrize("which", ["rank file", "manifest"])
def test_fifo_is_refused_without_blocking(which, archive, tmp_path):
    # A FIFO with no writer: opening or reading it would block forever.
    folder = write_folder(tmp_path / "model", archive)
    path = _rank_file(folder) if which == "rank file" else folder / MANIFEST_NAME
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(TracedModelCorruptError, match="not a regular file"):
        parallel_model_load(folder)


def test_device_file_is_refused_without_reading(archive, tmp_path):
    # /dev/zero's twin: reading it to the end (to checksum it) would never end.
    folder = write_folder(tmp_path / "model", archive)
    path = _rank_file(folder)
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    with pytest.raises(TracedModelCorruptError, match="not a regular file"):
        parallel_model_load(folder)


def test_rank_file_longer_than_recorded_is_refused(archive, tmp_path):
    folder = write_folder(tmp_path / "model", archive)
    with open(_rank_file(folder), "ab") as file:
        file.write(b"\0" * 10)
    with pytest.raises(TracedModelCorruptError, match=f"the manifest records {len(archive)}"):
        parallel_model_load(folder)


def test_checkpoint_folder_gets_a_clear_error(tmp_path):
    (tmp_path / "tp_rank_00").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(TracedModelNotFoundError, match="parallel_layers checkpoint.*parallel_layers.load"):
        parallel_model_load(tmp_path)


# ---- checks that need the workers: the program must match the manifest ----------------------------------------


def test_manifest_that_disagrees_with_the_program_is_refused(archive, tmp_path):
    # The rank file is intact (its sha256 matches) but the manifest records other shapes: the shared memory
    # would be laid out wrongly for the program.
    manifest = manifest_for(archive)
    manifest["inputs"]["positional"][0]["shape"] = [BATCH + 1, IN]
    folder = write_folder(tmp_path / "model", archive, manifest)
    with pytest.raises(TracedModelCorruptError, match="manifest records"):
        parallel_model_load(folder)


# ---- a closed model raises instead of crashing the process -----------------------------------------------------


def test_call_after_close_raises_in_a_child_process(archive, tmp_path):
    # Before the fix the call wrote into the unmapped shared memory and the process died of SIGSEGV:
    # run it in a child so that a regression fails this test instead of killing pytest.
    folder = write_folder(tmp_path / "model", archive)
    script = tmp_path / "call_after_close.py"
    script.write_text(textwrap.dedent(
        f"""
        import torch
        from neuronx_distributed.errors import TracedModelClosedError
        from neuronx_distributed.trace import parallel_model_load

        if __name__ == "__main__":
            x = torch.randn({BATCH}, {IN})
            model = parallel_model_load({str(folder)!r})
            model(x)
            model.close()
            try:
                model(x)
            except TracedModelClosedError as error:
                print("closed:", error)
            with parallel_model_load({str(folder)!r}) as model:
                model(x)
            try:
                model(x)
            except TracedModelClosedError:
                print("closed after with")
        """
    ))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "closed: this traced model's workers are stopped (it was closed)" in done.stdout
    assert "closed after with" in done.stdout

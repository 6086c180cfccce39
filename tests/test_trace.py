"""Traced tensor-parallel inference against the eager single-process model.

parallel_model_trace at TP=2 and TP=4 must give the unsharded model's outputs
(attention block and MLP from tests/models.py; MiniLM in test_trace_minilm.py);
a saved model must load and give them again in a fresh process that never
imported the model's class; a dead or failing worker must raise in the caller
(never hang) and leave no process behind; a script without the `__main__`
guard must fail with a clear error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import zipfile

import pytest
import torch
from models import MLP, SelfAttention
from torch import nn

from neuronx_distributed.errors import (
    TracedInputError,
    TracedModelClosedError,
    TracedModelCorruptError,
    TracedModelNotFoundError,
    TraceFunctionError,
    TraceWorkerError,
    WorkerCrashedError,
    WorkerTimeoutError,
)
from neuronx_distributed.trace import parallel_model_load, parallel_model_save, parallel_model_trace

HIDDEN, FFN, HEADS, BATCH, SEQ = 32, 64, 4, 2, 5
TOL = dict(rtol=1e-5, atol=1e-5)
CALL_TIMEOUT_S = 120


class Block(nn.Module):
    """An attention block and an MLP; returns both outputs in a dict."""

    def __init__(self, parallel: bool):
        super().__init__()
        self.attention = SelfAttention(HIDDEN, HEADS, parallel)
        self.mlp = MLP(HIDDEN, FFN, parallel)

    def forward(self, x):
        attention = self.attention(x)
        return {"attention": attention, "mlp": self.mlp(x + attention)}


def build_block(parallel: bool = True) -> Block:
    torch.manual_seed(0)
    return Block(parallel)


class RunningTotal(nn.Module):
    """Returns x * 2 + total and the new total; with io_aliases {total: 1} the total carries over between calls."""

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(HIDDEN), persistent=False)  # as KV caches are

    def forward(self, x):
        return x * 2 + self.total, self.total + x.sum(0)


def build_running_total():
    model = RunningTotal()
    return model, {model.total: 1}


class ThreadCount(nn.Module):
    """Returns x + the intra-op thread count of the process that traced it (a constant of the program)."""

    def forward(self, x):
        return x + torch.get_num_threads()


def build_thread_count() -> nn.Module:
    return ThreadCount()


def build_failing_on_rank_1() -> nn.Module:
    from neuronx_distributed import parallel_state

    if parallel_state.get_tensor_model_parallel_rank() == 1:
        raise ValueError("rank 1 cannot build its shard")
    return build_block()


def _example_input() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))


def _expected(x: torch.Tensor) -> dict:
    with torch.inference_mode():
        return build_block(parallel=False).eval()(x)


def _assert_processes_gone(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def traced_tp2():
    with parallel_model_trace(build_block, _example_input(), tp_degree=2) as model:
        yield model


@pytest.mark.parametrize("tp_degree", [2, 4])
def test_traced_block_equals_eager(tp_degree, traced_tp2):
    x = _example_input()
    if tp_degree == 2:
        outputs = traced_tp2(x)
    else:
        with parallel_model_trace(build_block, x, tp_degree=tp_degree) as model:
            outputs = model(x)
    expected = _expected(x)
    assert list(outputs) == ["attention", "mlp"]
    for name in expected:
        torch.testing.assert_close(outputs[name], expected[name], **TOL)
    # New inputs through the same traced program (the shared memory is reused between calls).
    y = torch.randn_like(x)
    torch.testing.assert_close(traced_tp2(y)["mlp"], _expected(y)["mlp"], **TOL)


def test_call_checks_inputs(traced_tp2):
    with pytest.raises(TracedInputError, match="traced as"):
        traced_tp2(torch.randn(BATCH + 1, SEQ, HIDDEN))
    with pytest.raises(TracedInputError, match="positional"):
        traced_tp2(_example_input(), _example_input())
    traced_tp2(_example_input())  # still usable


def test_save_load_round_trip_in_fresh_process(traced_tp2, tmp_path):
    save_dir = tmp_path / "tp_models"
    parallel_model_save(traced_tp2, save_dir)
    assert sorted(p.name for p in save_dir.iterdir()) == ["tp_rank_00", "tp_rank_01", "traced_model.json"]
    manifest = json.loads((save_dir / "traced_model.json").read_text())
    assert manifest["tp_degree"] == 2
    for rank, record in enumerate(manifest["ranks"]):
        assert re.fullmatch(rf"tp_rank_0{rank}/model-[0-9a-f]+\.pt2", record["file"]), record["file"]
        assert [p.name for p in (save_dir / f"tp_rank_0{rank}").iterdir()] == [record["file"].split("/")[1]]
    assert any(manifest["ranks"][0]["collectives"])  # the all-reduces are in the program

    x = _example_input()
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "load_and_run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            import torch
            from neuronx_distributed.trace import parallel_model_load

            if __name__ == "__main__":
                with parallel_model_load({str(save_dir)!r}) as model:
                    outputs = model(torch.load({str(tmp_path / "x.pt")!r}))
                leaked = [name for name in ("models", "test_trace") if name in sys.modules]
                assert not leaked, leaked
                torch.save(outputs, {str(tmp_path / "outputs.pt")!r})
            """
        )
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=CALL_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    outputs = torch.load(tmp_path / "outputs.pt")
    expected = _expected(x)
    for name in expected:
        torch.testing.assert_close(outputs[name], expected[name], **TOL)


def test_torch_engine_collectives_round_trip(monkeypatch, tmp_path):
    # With NXD_COMM_BACKEND=torch the all-reduce is traced as a c10d functional collective
    # naming its group; the loaded workers must recreate that group under the same name.
    monkeypatch.setenv("NXD_COMM_BACKEND", "torch")
    x = _example_input()
    with parallel_model_trace(build_block, x, tp_degree=2) as model:
        parallel_model_save(model, tmp_path / "tp_models")
    manifest = json.loads((tmp_path / "tp_models" / "traced_model.json").read_text())
    assert any(op.startswith("_c10d_functional.all_reduce") for op in manifest["ranks"][0]["collectives"])
    with parallel_model_load(tmp_path / "tp_models") as model:
        outputs = model(x)
    torch.testing.assert_close(outputs["mlp"], _expected(x)["mlp"], **TOL)


def test_load_rejects_missing_and_changed_files(traced_tp2, tmp_path):
    with pytest.raises(TracedModelNotFoundError):
        parallel_model_load(tmp_path / "nothing_here")
    save_dir = tmp_path / "tp_models"
    parallel_model_save(traced_tp2, save_dir)
    shard = _program_file(save_dir, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TracedModelCorruptError, match="tp_rank_01"):
        parallel_model_load(save_dir)
    manifest_path = save_dir / "traced_model.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ranks"][0]["file"] = "../elsewhere/model.pt2"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TracedModelCorruptError, match="elsewhere"):
        parallel_model_load(save_dir)


def _program_file(save_dir, rank: int):
    return save_dir / json.loads((save_dir / "traced_model.json").read_text())["ranks"][rank]["file"]


def test_failed_save_keeps_the_previous_model(traced_tp2, tmp_path, monkeypatch):
    """A save that fails after the workers wrote their files leaves the previous save loading, and no files behind."""
    from neuronx_distributed.trace import artifact

    save_dir = tmp_path / "tp_models"
    parallel_model_save(traced_tp2, save_dir)
    previous = {path: path.read_bytes() for path in save_dir.rglob("*") if path.is_file()}

    def disk_full(final, text, aside):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact, "replace_with_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        parallel_model_save(traced_tp2, save_dir)
    assert {path: path.read_bytes() for path in save_dir.rglob("*") if path.is_file()} == previous
    with pytest.raises(OSError, match="No space"):
        parallel_model_save(traced_tp2, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    killed = tmp_path / "killed" / "tp_rank_00"  # what a save killed before its manifest leaves
    killed.mkdir(parents=True)
    (killed / "model-0123abcd.pt2").write_bytes(b"partial")
    parallel_model_save(traced_tp2, tmp_path / "killed")
    assert "model-0123abcd.pt2" not in os.listdir(killed)

    parallel_model_save(traced_tp2, save_dir)  # replaces the previous save: its files are gone
    files = sorted(str(path.relative_to(save_dir)) for path in save_dir.rglob("*.pt2"))
    assert files == [record["file"] for record in json.loads((save_dir / "traced_model.json").read_text())["ranks"]]
    with parallel_model_load(save_dir) as model:
        outputs = model(_example_input())
    torch.testing.assert_close(outputs["mlp"], _expected(_example_input())["mlp"], **TOL)


def test_load_refuses_pickled_members(traced_tp2, tmp_path):
    save_dir = tmp_path / "tp_models"
    parallel_model_save(traced_tp2, save_dir)
    shard = _program_file(save_dir, 0)
    with zipfile.ZipFile(shard) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    sample_inputs = next(name for name in members if "sample_inputs" in name)
    members[sample_inputs] = pickle.dumps(("not", "weights only"))
    with zipfile.ZipFile(shard, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    manifest_path = save_dir / "traced_model.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ranks"][0].update(sha256=hashlib.sha256(shard.read_bytes()).hexdigest(), size=shard.stat().st_size)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TracedModelCorruptError, match="pickled"):
        parallel_model_load(save_dir)


def test_worker_crash_raises_and_stops_every_worker():
    x = _example_input()
    model = parallel_model_trace(build_block, x, tp_degree=2)
    pids = model.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    # Rank 0 enters the program and waits in its all-reduce for the dead rank: the call must not hang.
    with pytest.raises(WorkerCrashedError, match="tp rank 1 .* SIGKILL"):
        model(x)
    _assert_processes_gone(pids)
    with pytest.raises(TracedModelClosedError):
        model(x)
    model.close()


def test_worker_error_raises_with_its_traceback():
    before = {child.pid for child in multiprocessing.active_children()}
    with pytest.raises(TraceWorkerError, match="rank 1 cannot build its shard"):
        parallel_model_trace(build_failing_on_rank_1, _example_input(), tp_degree=2)
    assert {child.pid for child in multiprocessing.active_children()} <= before


def test_func_that_workers_cannot_import():
    with pytest.raises(TraceFunctionError, match="module level"):
        parallel_model_trace(lambda: build_block(), _example_input(), tp_degree=2)


def test_script_without_main_guard_fails_clearly(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from neuronx_distributed.trace import parallel_model_trace

            def build():
                return torch.nn.Linear(4, 4)

            model = parallel_model_trace(build, torch.randn(2, 4), tp_degree=2)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=CALL_TIMEOUT_S)
    assert done.returncode != 0
    assert "MissingMainGuardError" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr


def _running_total_reference(calls: list[torch.Tensor], total: torch.Tensor) -> tuple[list[tuple], torch.Tensor]:
    outputs = []
    for x in calls:
        outputs.append((x * 2 + total, total + x.sum(0)))
        total = outputs[-1][1]
    return outputs, total


def test_io_aliases_carry_state_between_calls_and_through_save(tmp_path, caplog):
    x = torch.randn(BATCH, HIDDEN, generator=torch.Generator().manual_seed(3))
    calls = [x, x + 1, x * 3]
    expected, total = _running_total_reference(calls, torch.zeros(HIDDEN))
    with caplog.at_level("WARNING", logger="neuronx_distributed.trace"):
        model = parallel_model_trace(
            build_running_total, example_inputs=x, tp_degree=2, serialization_path=tmp_path / "traced",
            compiler_workdir=tmp_path / "neuron", compiler_args="--model-type=transformer",
            inline_weights_to_neff=False, max_parallel_compilations=1,
        )
    ignored = [record.getMessage() for record in caplog.records if "ignoring Neuron-compiler" in record.getMessage()]
    assert len(ignored) == 1 and all(
        name in ignored[0] for name in ("compiler_workdir", "compiler_args", "inline_weights_to_neff", "max_parallel_compilations")
    ), ignored
    with model:
        for call, (first, second) in zip(calls, expected):
            outputs = model(call)
            torch.testing.assert_close(outputs[0], first, **TOL)
            torch.testing.assert_close(outputs[1], second, **TOL)
        parallel_model_save(model, tmp_path / "after_calls")
    assert json.loads((tmp_path / "traced" / "traced_model.json").read_text())["io_aliases"] == {"model.total": 1}
    # The save after the calls holds the running total; a loaded model goes on from there.
    with parallel_model_load(tmp_path / "after_calls") as loaded:
        outputs = loaded(x)
    torch.testing.assert_close(outputs[0], x * 2 + total, **TOL)
    torch.testing.assert_close(outputs[1], total + x.sum(0), **TOL)


def test_trace_arguments_that_cannot_work_fail_before_starting_workers():
    x = _example_input()
    with pytest.raises(TraceFunctionError, match="checkpoint_loader_callable"):
        parallel_model_trace(build_block, x, tp_degree=2, spmd_mode=True, checkpoint_loader_callable=dict)
    with pytest.raises(TraceFunctionError, match="not both"):
        parallel_model_trace(build_block, x, tp_degree=2, example_inputs=x)
    with pytest.raises(TraceFunctionError, match="call_timeout_s"):
        parallel_model_trace(build_block, x, tp_degree=2, call_timeout_s=0)
    with pytest.raises(TraceFunctionError, match="threads_per_worker"):
        parallel_model_trace(build_block, x, tp_degree=2, threads_per_worker=-1)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU affinity of two or more cores to narrow")
def test_default_threads_divide_the_cores_the_caller_may_use():
    # Under `taskset -c 0` (or a container's CPU set) a worker must not start a thread per core of the machine.
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})  # this thread's affinity, which the spawned workers inherit
    try:
        with parallel_model_trace(build_thread_count, torch.zeros(1), tp_degree=1) as model:
            threads = model(torch.zeros(1))
    finally:
        os.sched_setaffinity(0, cores)
    assert threads.item() == 1


def _stopped_worker_call(model, message: str) -> None:
    """Stop tp rank 1 with SIGSTOP and call: the call must raise, and every worker must be gone."""
    pids = model.worker_pids
    os.kill(pids[1], signal.SIGSTOP)
    # If the detection regressed, the call would wait for the stopped rank (gloo's 30-minute default):
    # resume it after a while, so that the call then returns and pytest.raises fails instead of hanging.
    resume = threading.Timer(CALL_TIMEOUT_S, lambda: os.kill(pids[1], signal.SIGCONT))
    resume.start()
    try:
        with pytest.raises(WorkerTimeoutError, match=message):
            model(_example_input())
    finally:
        resume.cancel()
    _assert_processes_gone(pids)
    with pytest.raises(TracedModelClosedError):
        model(_example_input())


def test_stopped_worker_ends_the_call_with_a_typed_error(traced_tp2, tmp_path):
    parallel_model_save(traced_tp2, tmp_path / "tp_models")
    with parallel_model_load(tmp_path / "tp_models") as model:
        _stopped_worker_call(model, "tp rank 1 of 2 .* is stopped")
    # A call timeout shorter than the stop detection: the call ends at the timeout, saying so.
    with parallel_model_load(tmp_path / "tp_models", call_timeout_s=0.1) as model:
        _stopped_worker_call(model, "call_timeout_s=0.1")
    # A call interrupted (Ctrl-C) while the workers run: its late replies must never answer the next call.
    with parallel_model_load(tmp_path / "tp_models", call_timeout_s=None) as model:
        pids = model.worker_pids
        os.kill(pids[1], signal.SIGSTOP)  # holds the call until the interrupt arrives
        # Ctrl-C's handler, run by a kernel timer's signal: it interrupts the wait after 0.2 s however the
        # threads are scheduled, well before the stop detection (two polls 0.5 s apart) could end the call.
        previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(KeyboardInterrupt):
                model(_example_input())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        with contextlib.suppress(ProcessLookupError):  # gone if the interrupt stopped every worker
            os.kill(pids[1], signal.SIGCONT)
        with pytest.raises(TracedModelClosedError, match="interrupted by KeyboardInterrupt"):
            model(_example_input())

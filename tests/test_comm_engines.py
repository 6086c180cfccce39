"""Each process group's engines, in real processes over gloo: chosen once per (device, dtype) and
cached, `set_backend` honoured, bad settings and ranks set up differently raising CommBackendError
on every rank, the package without its compiled extension, and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from distributed import WorkerPool
from neuronx_distributed import comm
from neuronx_distributed.errors import CommBackendError

ANSWER_S = 60


def _outcome(fn) -> str:
    try:
        return f"returned {fn()!r}"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        return f"{type(error).__name__}: {error}"


def run_engine_chosen_once() -> dict:
    group = dist.new_group([0, 1])
    engines = comm.set_up(group)
    for _ in range(20):
        comm.all_reduce(torch.ones(4), group=group)
    after_floats = engines.decisions
    integers = comm.all_reduce(torch.ones(3, dtype=torch.int64), group=group)
    for _ in range(5):
        comm.all_reduce(torch.ones(3, dtype=torch.int64), group=group)
    return {
        "same object": comm.set_up(group) is engines,
        "decisions after floats": after_floats,
        "decisions after integers": engines.decisions,
        "float32": comm.engine_for(group).name,
        "int64": comm.engine_for(group, torch.ones(1, dtype=torch.int64)).name,
        "integers": integers.tolist(),
    }


def test_engine_is_chosen_once_per_group_device_and_dtype(pools):
    for got in pools.get(2).run(run_engine_chosen_once, timeout=ANSWER_S):
        assert got["same object"]
        assert got["decisions after floats"] == 1 and got["decisions after integers"] == 2
        assert got["float32"] == "shm" and got["int64"] == "torch"
        assert got["integers"] == [2, 2, 2]


def run_set_backend_honoured() -> dict:
    group = dist.new_group([0, 1])
    engines = {}
    try:
        for backend in ("torch", "shm", "auto"):
            comm.set_backend(backend)
            with comm.record_collectives() as log:
                total = comm.all_reduce(torch.full((4,), float(dist.get_rank() + 1)), group=group)
            engines[backend] = (log.calls[0][1], comm.set_up(group).backend, total.tolist())
    finally:
        comm.set_backend("auto")
    engines["bad"] = _outcome(lambda: comm.set_backend("fastest"))
    return engines


def test_set_backend_is_honoured(pools):
    for got in pools.get(2).run(run_set_backend_honoured, timeout=ANSWER_S):
        assert got["torch"] == ("torch", "torch", [3.0] * 4)
        assert got["shm"] == ("shm", "shm", [3.0] * 4)
        assert got["auto"] == ("shm", "auto", [3.0] * 4)
        assert got["bad"].startswith("CommBackendError") and "not one of auto, shm, torch" in got["bad"]


def run_bad_setting_on_rank_0_only(variable: str, value: str) -> str:
    import os

    if dist.get_rank() == 0:
        os.environ[variable] = value
    try:
        return _outcome(lambda: comm.all_reduce(torch.ones(2), group=dist.new_group([0, 1])))
    finally:
        os.environ.pop(variable, None)


@pytest.mark.parametrize(
    "variable, value, text",
    [("NXD_COMM_BACKEND", "fast", "not one of auto, shm, torch"), ("NXD_COMM_TIMEOUT", "soon", "positive number")],
)
def test_bad_setting_on_one_rank_raises_at_set_up_on_every_rank(pools, variable, value, text):
    for got in pools.get(2).run(run_bad_setting_on_rank_0_only, variable, value, timeout=ANSWER_S):
        assert got.startswith("CommBackendError") and f"global rank 0: {variable}={value!r}" in got and text in got


def run_initialize_with_bad_backend() -> str:
    from neuronx_distributed import parallel_state

    return _outcome(lambda: parallel_state.initialize_model_parallel(tensor_model_parallel_size=2))


def test_bad_environment_does_not_break_import_and_raises_at_initialize_on_every_rank():
    pool = WorkerPool(2, env={"NXD_COMM_BACKEND": "fast"})  # the workers import neuronx_distributed with it set
    try:
        for got in pool.run(run_initialize_with_bad_backend, timeout=ANSWER_S):
            assert got.startswith("CommBackendError") and "NXD_COMM_BACKEND='fast'" in got, got
    finally:
        pool.close()


def run_ranks_set_up_differently() -> dict:
    group = dist.new_group([0, 1])
    comm.set_up(group)
    outcomes = {"set_backend": _outcome(lambda: comm.set_backend("shm" if dist.get_rank() == 0 else "torch"))}
    outcomes["call"] = _outcome(lambda: comm.all_reduce(torch.ones(2), group=group))
    comm.set_backend("auto")
    outcomes["after agreeing"] = comm.all_reduce(torch.ones(2), group=group).tolist()
    return outcomes


def test_ranks_set_up_with_different_engines_raise_on_every_rank(pools):
    for got in pools.get(2).run(run_ranks_set_up_differently, timeout=ANSWER_S):
        for key in ("set_backend", "call"):
            assert got[key].startswith("CommBackendError"), got[key]
            assert "different comm backends (shm on global ranks [0]; torch on global ranks [1])" in got[key]
        assert got["after agreeing"] == [2.0, 2.0]


def run_compiled_fullgraph() -> dict:
    group = dist.new_group([0, 1])
    comm.set_up(group)
    graphs = []

    def record_graph(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return graph_module

    def step(x):
        y = x * 2
        comm.all_reduce(y, group=group)
        return y + 1

    x = torch.full((4,), float(dist.get_rank() + 1))
    compiled = torch.compile(step, backend=record_graph, fullgraph=True)(x)
    return {"compiled": compiled.tolist(), "eager": step(x).tolist(), "graphs": graphs}


def test_compiled_fullgraph_call_goes_through_the_custom_op(pools):
    for got in pools.get(2).run(run_compiled_fullgraph, timeout=ANSWER_S):
        assert got["compiled"] == got["eager"] == [7.0] * 4
        assert len(got["graphs"]) == 1 and "nxd.shm_all_reduce_" in got["graphs"][0], got["graphs"]


# Two processes in a fresh interpreter each, with neuronx_distributed._C unimportable.
WITHOUT_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, json, multiprocessing as mp, sys, warnings

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "neuronx_distributed._C":
                raise ImportError("blocked by the test")
            return None

    def rank_main(rank, store, results):
        sys.meta_path.insert(0, BlockExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, torch.distributed as dist
            from neuronx_distributed import comm, parallel_state
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
        with comm.record_collectives() as log:
            total = comm.all_reduce(torch.full((3,), float(rank + 1)))
            gathered = comm.all_gather(torch.tensor([float(rank)]), dim=0)
        try:
            comm.set_backend("shm")
            forced = "no error"
        except Exception as error:
            forced = type(error).__name__ + ": " + str(error)
        built = [str(w.message) for w in caught if "make setup" in str(w.message)]
        results.put((rank, total.tolist(), gathered.tolist(), [e for _, e, _ in log.calls],
                     comm.shm_engine_available(), len(built), forced))
        dist.destroy_process_group()

    if __name__ == "__main__":
        context = mp.get_context("spawn")
        results = context.Queue()
        procs = [context.Process(target=rank_main, args=(rank, sys.argv[1], results)) for rank in range(2)]
        for proc in procs:
            proc.start()
        got = sorted(results.get(timeout=120) for _ in procs)
        for proc in procs:
            proc.join()
        print(json.dumps(got))
    """
)


def test_package_works_without_the_compiled_extension(tmp_path):
    script = tmp_path / "without_extension.py"
    script.write_text(WITHOUT_EXTENSION)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for rank, total, gathered, engines, available, warnings_about_building, forced in got:
        assert total == [3.0] * 3 and gathered == [0.0, 1.0]
        assert engines == ["torch", "torch"] and available is False
        assert warnings_about_building == 1
        assert forced.startswith("CommBackendError") and "lack the compiled extension" in forced, forced

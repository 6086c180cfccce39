"""The GPU suite: the equivalence tests on NXD_TEST_DEVICE (default cuda), skipped with one line where it cannot run.

World sizes 1 and 2 run over gloo with tensors on the test device (gloo's own CUDA
collectives copy through pinned host memory), with every rank on GPU 0 on a
one-GPU machine; TP 2 and 4 also run over NCCL where there is a GPU per rank.
The comm engine is forced to torch.distributed, so that `NXD_TEST_DEVICE=cpu`
runs the very path that CUDA tensors take (CPU tensors would go to shared memory).
"""

from __future__ import annotations

import pytest
from conftest import Pools
from .device import nccl_world_sizes, skip_reason, suite_device

from neuronx_distributed import comm

# (backend, world size, TP size): gloo at world sizes 1 and 2, NCCL at TP 2 and 4 where the GPUs allow.
TOPOLOGIES = [("gloo", 1, 1), ("gloo", 2, 1), ("gloo", 2, 2), *(("nccl", n, n) for n in nccl_world_sizes())]
TOPOLOGY_IDS = [f"{backend}-world{world}-tp{tp}" for backend, world, tp in TOPOLOGIES]
_BACKENDS = {"gloo": "gloo", "nccl": "cpu:gloo,cuda:nccl"}  # CPU tensors (checkpoint agreement) stay on gloo


_SKIP_REASON = skip_reason()
# Without the device nothing here is collected; one summary line says why, and a run of this folder alone
# (nothing collected) still succeeds, so `make test` on a CPU machine is as it was.
collect_ignore_glob = ["test_*.py"] if _SKIP_REASON else []


def pytest_terminal_summary(terminalreporter):
    if _SKIP_REASON:
        terminalreporter.write_line(_SKIP_REASON)


def pytest_sessionfinish(session, exitstatus):
    if _SKIP_REASON and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


class DevicePools:
    """Worker pools per backend, each rank on the test device."""

    def __init__(self):
        cuda = suite_device() == "cuda"
        self._pools = {
            name: Pools(backend=backend, cuda=cuda, env={comm.BACKEND_ENV: "torch"}) for name, backend in _BACKENDS.items()
        }

    def run(self, backend: str, world_size: int, tensor_parallel_size: int, fn, *args, **kwargs) -> list:
        return self._pools[backend].run(world_size, tensor_parallel_size, fn, *args, **kwargs)

    def close(self):
        for pools in self._pools.values():
            pools.close()


@pytest.fixture(scope="session")
def device_pools():
    pools = DevicePools()
    yield pools
    pools.close()


@pytest.fixture(scope="session")
def device() -> str:
    return suite_device()

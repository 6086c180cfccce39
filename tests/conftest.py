import pytest

from distributed import WorkerPool, with_model_parallel

# (world size, tensor-parallel size): TP in {1, 2, 4} with the DP that results.
TOPOLOGIES = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]


class Pools:
    """One live WorkerPool per world size, replaced when a failure tore it down (`pool_options`: WorkerPool's)."""

    def __init__(self, **pool_options):
        self._pool_options = pool_options
        self._pools: dict[int, WorkerPool] = {}

    def get(self, world_size: int) -> WorkerPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = WorkerPool(world_size, **self._pool_options)
        return pool

    def run(self, world_size: int, tensor_parallel_size: int, fn, *args, **kwargs) -> list:
        """Run `fn` on every rank of a `world_size` pool inside initialize_model_parallel(tp)."""
        return self.get(world_size).run(with_model_parallel, tensor_parallel_size, fn, *args, **kwargs)

    def close(self):
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools():
    pools = Pools()
    yield pools
    pools.close()

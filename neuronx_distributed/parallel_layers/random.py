"""Random-number streams for tensor parallelism: one shared by the TP group, one of its own per TP rank.

After `model_parallel_manual_seed(seed)` (upstream: `model_parallel_xla_manual_seed`)
the default generators hold `seed` on every rank, so random ops on replicated
activations (dropout outside the sharded regions) draw the same numbers on every
rank of a TP group. The tracker's model-parallel state holds
`seed + 2718 + tp_rank`: inside `get_rng_state_tracker().fork()` random ops on
sharded activations (dropout on a rank's attention heads) draw different numbers
on the ranks of a TP group and the same numbers on the matching ranks of every
data-parallel replica. Re-seeding with the same seed replays both streams.

A state is the CPU generator's state plus, when an accelerator is present (CUDA
or another `torch.accelerator`), the state of the current device's generator;
`fork()` swaps both in and out.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import RNGStateTrackerError
from . import parallel_state

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
# Upstream's offset between the seed and the TP ranks' seeds ("any positive value works").
_MODEL_PARALLEL_SEED_OFFSET = 2718
_CPU = "cpu"


def _accelerator():
    """(device type, current device index) of the accelerator in use, or None on a CPU-only host."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return None
    return accelerator.type, torch.accelerator.current_device_index()


def _current_states() -> dict[str, torch.Tensor]:
    states = {_CPU: torch.get_rng_state()}
    accelerator = _accelerator()
    if accelerator is not None:
        device_type, index = accelerator
        states[device_type] = torch.get_device_module(device_type).get_rng_state(index)
    return states


def _restore_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states[_CPU])
    accelerator = _accelerator()
    if accelerator is not None:
        device_type, index = accelerator
        torch.get_device_module(device_type).set_rng_state(states[device_type], index)


def _seeded_states(seed: int) -> dict[str, torch.Tensor]:
    """The states `torch.manual_seed(seed)` would give, made without touching the live generators."""
    states = {_CPU: torch.Generator().manual_seed(seed).get_state()}
    accelerator = _accelerator()
    if accelerator is not None:
        device_type, index = accelerator
        generator = torch.Generator(device=torch.device(device_type, index)).manual_seed(seed)
        states[device_type] = generator.get_state()
    return states


class RNGStatesTracker:
    """Named random-number states that `fork(name)` swaps in for the duration of a block.

    `add(name, seed)` creates a state; inside `fork(name)` random ops draw from it,
    and on exit the state has advanced past what they drew while the default
    generators are back where they were before the block.
    """

    def __init__(self):
        self.states_: dict[str, dict[str, torch.Tensor]] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        """Forget every state and seed."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A new dict of the current states by name (each `{"cpu": ByteTensor, <accelerator>: ByteTensor}`)."""
        return dict(self.states_)

    def set_states(self, states: dict) -> None:
        """Replace the states by those of `get_states()`; raise on anything else.

        Upstream takes any dict unchecked; a malformed one here raises
        RNGStateTrackerError instead of failing inside a later `fork()`.
        """
        if not isinstance(states, dict):
            raise RNGStateTrackerError(f"set_states takes the dict get_states() returned, got {type(states).__name__}.")
        for name, state in states.items():
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()) or _CPU not in state:
                raise RNGStateTrackerError(
                    f"state {name!r} is not a dict of generator states with a {_CPU!r} entry; "
                    "pass the dict that get_states() returned."
                )
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        """Create state `name` seeded with `seed`; the default generators are left untouched."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RNGStateTrackerError(f"the seed of RNG state {name!r} must be an int, got {seed!r}.")
        if seed in self.seeds_:
            raise RNGStateTrackerError(f"seed {seed} is already used by another RNG state; give {name!r} its own seed.")
        if name in self.states_:
            raise RNGStateTrackerError(f"RNG state {name!r} already exists; call reset() before adding it again.")
        self.seeds_.add(seed)
        self.states_[name] = _seeded_states(seed)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Draw random numbers from state `name` inside the block, then restore the default generators."""
        if name not in self.states_:
            raise RNGStateTrackerError(
                f"RNG state {name!r} was never added; call model_parallel_manual_seed(seed) "
                "(or tracker.add(name, seed)) before forking it."
            )
        outside = _current_states()
        _restore_states(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = _current_states()
            _restore_states(outside)


# Upstream's class name.
XLARNGStatesTracker = RNGStatesTracker

_RNG_STATE_TRACKER = RNGStatesTracker()


def get_rng_state_tracker() -> RNGStatesTracker:
    """The process's tracker, whose model-parallel state `model_parallel_manual_seed` seeds."""
    return _RNG_STATE_TRACKER


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default generators with `seed` and the tracker's model-parallel state per TP rank.

    Call it after `initialize_model_parallel`, in place of `torch.manual_seed`,
    with the same seed on every rank. The default generators (CPU and accelerator)
    get `seed`; the tracker is reset and its `_MODEL_PARALLEL_RNG_TRACKER_NAME`
    state gets `seed + 2718 + tensor-parallel rank`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RNGStateTrackerError(f"model_parallel_manual_seed takes an int seed, got {seed!r}.")
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    _RNG_STATE_TRACKER.reset()
    torch.manual_seed(seed)
    _RNG_STATE_TRACKER.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _MODEL_PARALLEL_SEED_OFFSET + tp_rank)


# Upstream's names (XLA is not involved here: the same streams on every device).
get_xla_rng_tracker = get_rng_state_tracker
model_parallel_xla_manual_seed = model_parallel_manual_seed

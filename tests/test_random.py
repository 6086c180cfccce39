"""The tensor-parallel RNG tracker on real process groups.

Inside `fork()` dropout masks differ across the ranks of a TP group and agree
across DP replicas; outside they agree across the TP group and follow the plain
`torch.manual_seed(seed)` stream as if the fork had not happened; re-seeding
replays; states round-trip; duplicate names and seeds raise. The BERT tutorial's
attention dropout draws a different mask on each TP rank (its heads differ).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOPOLOGIES

from neuronx_distributed import parallel_state
from neuronx_distributed.errors import RNGStateTrackerError
from neuronx_distributed.parallel_layers import random as tp_random
from neuronx_distributed.parallel_layers.random import (
    _MODEL_PARALLEL_RNG_TRACKER_NAME,
    get_rng_state_tracker,
    get_xla_rng_tracker,
    model_parallel_manual_seed,
    model_parallel_xla_manual_seed,
)

SEED = 1234
SIZE = 256
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "training" / "tp_dp_bert_hf_pretrain"


def _mask() -> torch.Tensor:
    return F.dropout(torch.ones(SIZE), p=0.5, training=True) == 0


def _draws():
    model_parallel_manual_seed(SEED)
    tracker = get_rng_state_tracker()
    outside_1 = _mask()
    with tracker.fork():
        inside_1 = _mask()
    outside_2 = _mask()
    with tracker.fork():
        inside_2 = _mask()
    model_parallel_manual_seed(SEED)  # re-seeding replays both streams
    replay_outside = _mask()
    with tracker.fork():
        replay_inside = _mask()
    return dict(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        outside=(outside_1, outside_2),
        inside=(inside_1, inside_2),
        replay=(replay_outside, replay_inside),
    )


def _reference_masks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return _mask(), _mask()


@pytest.mark.parametrize("world_size,tp", TOPOLOGIES)
def test_fork_differs_across_tp_and_agrees_across_dp(pools, world_size, tp):
    results = pools.run(world_size, tp, _draws)
    plain = _reference_masks(SEED)
    inside_by_tp_rank = {}
    for rank, result in enumerate(results):
        # Outside the fork: torch.manual_seed(seed)'s stream on every rank, untouched by the forks in between.
        for got, expected in zip(result["outside"], plain):
            assert torch.equal(got, expected), f"rank {rank}"
        # Inside: upstream's seed + 2718 + tp_rank, continuing from one fork to the next.
        for got, expected in zip(result["inside"], _reference_masks(SEED + 2718 + result["tp_rank"])):
            assert torch.equal(got, expected), f"rank {rank}"
        assert not torch.equal(result["inside"][0], result["inside"][1])
        assert torch.equal(result["replay"][0], result["outside"][0])
        assert torch.equal(result["replay"][1], result["inside"][0])
        inside_by_tp_rank.setdefault(result["tp_rank"], []).append(result["inside"][0])
    for masks in inside_by_tp_rank.values():  # DP replicas of one TP rank agree
        assert all(torch.equal(mask, masks[0]) for mask in masks)
    firsts = [masks[0] for masks in inside_by_tp_rank.values()]
    for i in range(len(firsts)):  # the ranks of a TP group differ
        for j in range(i + 1, len(firsts)):
            assert not torch.equal(firsts[i], firsts[j])


def _tracker_api():
    model_parallel_manual_seed(SEED)
    tracker = get_rng_state_tracker()
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(8)
    tracker.set_states(saved)  # back to the saved state: the fork draws the same numbers again
    with tracker.fork():
        again = torch.rand(8)
    assert torch.equal(first, again)
    assert tracker.get_states() is not tracker.states_

    # A failing block still restores the default generator and keeps the state it advanced to.
    before = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError), tracker.fork():
        torch.rand(3)
        raise ZeroDivisionError
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        after_failure = torch.rand(8)
    assert not torch.equal(after_failure, again)

    # add() leaves the default generator alone and rejects duplicate names or seeds without changing anything.
    before = torch.get_rng_state()
    tracker.add("other", 99)
    assert torch.equal(torch.get_rng_state(), before)
    states_before = tracker.get_states()
    errors = []
    for name, seed in (("other", 100), ("third", 99), (_MODEL_PARALLEL_RNG_TRACKER_NAME, 5)):
        with pytest.raises(RNGStateTrackerError) as error:
            tracker.add(name, seed)
        errors.append(str(error.value))
    assert tracker.get_states().keys() == states_before.keys() and 100 not in tracker.seeds_
    assert all(torch.equal(tracker.states_["other"][k], v) for k, v in states_before["other"].items())
    with pytest.raises(RNGStateTrackerError, match="never added"):
        with tracker.fork("missing"):
            pass
    with pytest.raises(RNGStateTrackerError):
        tracker.set_states({"x": torch.get_rng_state()})
    with pytest.raises(RNGStateTrackerError):
        tracker.add("float seed", 1.5)
    with pytest.raises(RNGStateTrackerError):
        model_parallel_manual_seed("7")

    tracker.reset()
    assert tracker.get_states() == {}
    tracker.add("other", 99)  # reset forgets the seeds too
    return errors


def test_tracker_api(pools):
    (errors,) = pools.run(1, 1, _tracker_api)
    assert "already exists" in errors[0] and "already used" in errors[1]


def test_upstream_names():
    assert get_xla_rng_tracker is get_rng_state_tracker
    assert model_parallel_xla_manual_seed is model_parallel_manual_seed
    assert tp_random.XLARNGStatesTracker is tp_random.RNGStatesTracker
    assert _MODEL_PARALLEL_RNG_TRACKER_NAME == "model-parallel-rng"


def _bert_attention_dropout_masks():
    sys.path.insert(0, str(EXAMPLE))
    from parallel_bert import ParallelSelfAttention, bert_config

    config = bert_config("tiny", dropout=0.5)
    config._attn_implementation = "eager"  # returns the attention probabilities after dropout
    model_parallel_manual_seed(SEED)
    attention = ParallelSelfAttention(config).train()
    hidden = torch.randn(2, 8, config.hidden_size, generator=torch.Generator().manual_seed(0))
    _, probabilities = attention(hidden)
    return parallel_state.get_tensor_model_parallel_rank(), probabilities == 0  # softmax is never 0 but where dropped


def test_bert_attention_dropout_differs_across_tp_ranks(pools):
    pytest.importorskip("transformers")
    results = pools.run(4, 2, _bert_attention_dropout_masks)
    (tp0, mask0), (tp1, mask1), (tp0_dp1, mask2), _ = results
    assert (tp0, tp1, tp0_dp1) == (0, 1, 0)
    assert mask0.any() and not torch.equal(mask0, mask1), "TP ranks drew the same dropout mask for different heads"
    assert torch.equal(mask0, mask2), "DP replicas of one TP rank should draw the same mask"

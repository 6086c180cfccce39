"""Causal-LM sequences from the token stream that build_causal_lm_data.py writes, split per data-parallel replica.

The stream is cut into N = (num_tokens - 1) // seq_len windows of seq_len + 1 tokens
(window i starts at token i * seq_len): a window's first seq_len tokens are the
inputs and its last seq_len tokens their next-token labels. Sample k of the
training order is window perm_e[k mod N], where e = k // N is the epoch and perm_e
a permutation drawn from (seed, e). The order depends on the sample number only,
so a run resumed after S samples continues exactly where it stopped, and every
TP x DP layout with the same global batch trains on the same sequences: micro-step m of
an optimizer step hands replica r the samples
`start + (m * DP + r) * batch_size ... + batch_size`.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np
import torch


class CausalLMDataError(ValueError):
    """The data folder is missing, incomplete, or too short for the requested sequence length."""


class TokenSequences:
    """The windows of seq_len + 1 tokens of one data folder (the stream memory-mapped, not loaded)."""

    def __init__(self, data_dir: str, seq_len: int, seed: int):
        data_dir = os.path.expanduser(data_dir)
        metadata_path = os.path.join(data_dir, "metadata.json")
        if not os.path.isfile(metadata_path):
            raise CausalLMDataError(
                f"{data_dir} holds no metadata.json; build the data with build_causal_lm_data.py --output_dir {data_dir}."
            )
        with open(metadata_path) as f:
            self.metadata = json.load(f)
        self.tokens = np.load(os.path.join(data_dir, "tokens.npy"), mmap_mode="r", allow_pickle=False)
        if self.tokens.ndim != 1 or len(self.tokens) != self.metadata["num_tokens"]:
            raise CausalLMDataError(
                f"{data_dir}/tokens.npy holds {self.tokens.shape} tokens but metadata.json says "
                f"{self.metadata['num_tokens']}; rebuild the data."
            )
        self.seq_len, self.seed = seq_len, seed
        self.num_sequences = (len(self.tokens) - 1) // seq_len
        if self.num_sequences < 1:
            raise CausalLMDataError(
                f"{data_dir} holds {len(self.tokens)} tokens, too few for one sequence of {seq_len + 1}; "
                "pass a smaller --seq_len or build from more text."
            )

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    def _order(self, epoch: int) -> np.ndarray:
        return _permutation(self.num_sequences, self.seed, epoch)

    def samples(self, first: int, count: int) -> torch.Tensor:
        """Samples first .. first + count - 1 of the training order, int64 [count, seq_len + 1]."""
        windows = []
        for k in range(first, first + count):
            start = int(self._order(k // self.num_sequences)[k % self.num_sequences]) * self.seq_len
            windows.append(self.tokens[start : start + self.seq_len + 1])
        return torch.from_numpy(np.stack(windows).astype(np.int64))

    def replica_micro_batches(self, first: int, batch_size: int, grad_accum_usteps: int, dp_size: int, dp_rank: int):
        """This replica's micro-batches of the optimizer step whose samples start at `first`."""
        return [
            self.samples(first + (micro * dp_size + dp_rank) * batch_size, batch_size) for micro in range(grad_accum_usteps)
        ]


@lru_cache(maxsize=2)
def _permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_sequences)

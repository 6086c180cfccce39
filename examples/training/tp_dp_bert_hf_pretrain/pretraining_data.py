"""BERT pretraining shards in the NVIDIA HDF5 format, read per data-parallel rank.

A shard is an HDF5 file named `*_training_*.hdf5` with one row per sequence:

    input_ids            int   [N, seq_len]   [CLS] A [SEP] B [SEP], zero-padded
    input_mask           int   [N, seq_len]   1 for real tokens, 0 for padding
    segment_ids          int   [N, seq_len]   0 for A (and [CLS]), 1 for B
    masked_lm_positions  int   [N, max_pred]  positions of the masked tokens, zero-padded
    masked_lm_ids        int   [N, max_pred]  the original ids at those positions
    next_sentence_labels int   [N]            1 if B is a random sentence, 0 if it follows A
"""

from __future__ import annotations

import glob
import os
import random

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from neuronx_distributed.parallel_layers import parallel_state

# The datasets of a shard, in the order of a dataset item (as the training loop unpacks it).
ITEM_ORDER = ("input_ids", "segment_ids", "input_mask", "masked_lm_positions", "masked_lm_ids", "next_sentence_labels")


class PretrainingDataError(ValueError):
    """The data directory or a shard in it is not usable for pretraining."""


def training_shards(data_dir: str, epoch: int, seed: int) -> list[str]:
    """The `*_training_*.hdf5` files in `data_dir`, in an order shuffled by (seed, epoch)."""
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
        raise PretrainingDataError(
            f"data directory {data_dir} does not exist; build shards with build_pretraining_shards.py "
            "or pass --data_dir."
        )
    files = sorted(glob.glob(os.path.join(data_dir, "*_training_*.hdf5")))
    if not files:
        raise PretrainingDataError(f"no *_training_*.hdf5 shards in {data_dir}; build them with build_pretraining_shards.py.")
    random.Random(f"{seed}-{epoch}").shuffle(files)
    return files


class PretrainingDataset(Dataset):
    """One HDF5 shard held in memory; items are int64 tensors in ITEM_ORDER."""

    def __init__(self, input_file: str, max_pred_length: int):
        with h5py.File(input_file, "r") as f:
            missing = [key for key in ITEM_ORDER if key not in f]
            if missing:
                raise PretrainingDataError(f"{input_file} lacks the datasets {missing}; it is not a BERT pretraining shard.")
            self.inputs = {key: np.asarray(f[key][:], dtype=np.int64) for key in ITEM_ORDER}
        shard_pred_length = self.inputs["masked_lm_positions"].shape[1]
        if shard_pred_length != max_pred_length:
            raise PretrainingDataError(
                f"{input_file} holds {shard_pred_length} masked positions per sequence, but --max_pred_len is "
                f"{max_pred_length}; pass --max_pred_len {shard_pred_length}."
            )

    @property
    def sequence_length(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def __len__(self) -> int:
        return len(self.inputs["input_ids"])

    def __getitem__(self, index: int):
        return tuple(torch.from_numpy(np.asarray(self.inputs[key][index])) for key in ITEM_ORDER)


def create_pretraining_dataloader(input_file: str, max_pred_length: int, mini_batch_size: int, seed: int, epoch: int):
    """The seed's loader: a DistributedSampler over the DP group, so the TP ranks of a replica see the same data."""
    dataset = PretrainingDataset(input_file, max_pred_length)
    sampler = DistributedSampler(
        dataset,
        num_replicas=parallel_state.get_data_parallel_world_size(),
        rank=parallel_state.get_data_parallel_rank(),
        seed=seed,
        # Every replica gets floor(N / DP) sequences, so DP=k with batch b walks the
        # same global batches as DP=1 with batch k*b.
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=mini_batch_size,
        num_workers=0,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )

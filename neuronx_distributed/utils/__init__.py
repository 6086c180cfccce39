"""Upstream NxD's process-level helpers, for code that runs on CPU and accelerators alike.

Upstream switches between an XLA (Neuron) path and a CPU path. Nothing in this
library runs through XLA, so the CPU path of upstream code is the one that
applies on every device here: `cpu_mode()` is True, `mark_step()` does nothing,
and `get_device()` names the device this process computes on (its CUDA device,
or the CPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def cpu_mode() -> bool:
    """True: run upstream's non-XLA code paths (plain PyTorch ops, no XLA device, no graph cuts).

    Upstream returns True when NXD_CPU_MODE is set and False on Neuron devices.
    This library never runs on XLA, so its answer is True on CPU and CUDA alike;
    NXD_CPU_MODE is not read. Code that needs to know the device calls `get_device()`.
    """
    return True


def mark_step() -> None:
    """Do nothing: upstream cuts the lazy XLA graph here, and no computation here is lazy."""


def get_device() -> torch.device:
    """The device this process computes on: its accelerator device when one is present, else the CPU.

    The accelerator index is LOCAL_RANK (as torchrun sets it and as
    `initialize_model_parallel` binds CUDA devices), or the current device when
    LOCAL_RANK is unset. Upstream returns the XLA device, or the CPU in CPU mode.
    """
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    index = int(local_rank) if local_rank is not None else torch.accelerator.current_device_index()
    return torch.device(accelerator.type, index)


def master_print(msg) -> None:
    """Print `msg` (flushed) on global rank 0 only, or always when torch.distributed is not initialized."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)

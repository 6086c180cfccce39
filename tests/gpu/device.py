"""Which device the GPU suite runs on: NXD_TEST_DEVICE (default cuda), and why it skips where it cannot run.

`python tests/gpu/device.py` prints the one-line reason and exits 3 when the suite
would skip (the `make test-gpu` check), or exits 0 silently when it can run.
"""

from __future__ import annotations

import os
import sys

import torch

DEVICE_ENV = "NXD_TEST_DEVICE"
SKIP_EXIT_CODE = 3


def suite_device() -> str:
    """The device type the suite runs on: `cuda` unless NXD_TEST_DEVICE names another (`cpu` checks it here)."""
    return os.environ.get(DEVICE_ENV, "cuda").strip().lower() or "cuda"


def skip_reason() -> str | None:
    """Why the suite cannot run on this machine, or None when it can."""
    device = suite_device()
    if device == "cpu":
        return None
    if device != "cuda":
        return f"{DEVICE_ENV}={device!r} is not supported: use cuda (the default) or cpu"
    if not torch.cuda.is_available():
        return (f"GPU suite skipped: no CUDA device (torch {torch.__version__}); "
                f"{DEVICE_ENV}=cpu runs the same tests on CPU")
    return None


def nccl_world_sizes() -> list[int]:
    """TP sizes (2 and 4) that NCCL can run here: one GPU per rank."""
    if suite_device() != "cuda" or not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        return []
    return [size for size in (2, 4) if torch.cuda.device_count() >= size]


if __name__ == "__main__":
    reason = skip_reason()
    if reason is not None:
        print(f"test-gpu: {reason}")
    sys.exit(0 if reason is None else SKIP_EXIT_CODE)

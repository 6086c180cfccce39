"""`get_logger`: the library's loggers, optionally silent on every rank but global rank 0."""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

_FORMAT = "[%(asctime)s.%(msecs)03d %(levelname).1s %(filename)s:%(lineno)d] %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def _global_rank() -> int:
    """This process's rank: torch.distributed's once initialized, else torchrun's RANK (0 when unset)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


class _RankZeroFilter(logging.Filter):
    """Pass records on global rank 0 only; the rank is read when the record is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _global_rank() == 0


def get_logger(name: str = "neuronx_distributed", rank0_only: bool = True) -> logging.Logger:
    """A logger printing to stdout at INFO; with `rank0_only`, only global rank 0 emits its records.

    As upstream, the two kinds are separate loggers (`name[0]` and `name[]`) that
    do not propagate to the root logger, and repeated calls return the same one.
    Upstream sets the level from NXD_LOG_LEVEL; here call `setLevel` on the result.
    """
    logger = logging.getLogger(f"{name}[0]" if rank0_only else f"{name}[]")
    if not getattr(logger, "nxd_configured", False):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATE_FORMAT))
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        if rank0_only:
            logger.addFilter(_RankZeroFilter())
        logger.nxd_configured = True
    return logger

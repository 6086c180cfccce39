"""Upstream NxD's trainer API: a config, a parallel model and optimizer built from it, and tagged checkpoints."""

from .model import NxDModel

__all__ = ["NxDModel"]

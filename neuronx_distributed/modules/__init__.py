"""Composite layers built from the parallel layers (upstream's `neuronx_distributed.modules`)."""

from . import qkv_linear

__all__ = ["qkv_linear"]

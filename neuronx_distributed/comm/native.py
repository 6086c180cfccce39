"""The compiled extension `neuronx_distributed._C` (the shared-memory engine), or None.

Without it the package still imports and every collective runs on torch.distributed;
importing `comm` then warns once, saying how to build it.
"""

from __future__ import annotations

import warnings

BUILD_HINT = "build it with `make setup` or `pip install --no-build-isolation -e .`"

try:
    from .. import _C
except ImportError as error:
    _C = None
    warnings.warn(
        f"neuronx_distributed._C, the shared-memory collective engine, is not available ({error}); collectives "
        f"run on torch.distributed only. To use it, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )

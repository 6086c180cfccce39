"""`move_model_to_device` at the module path the seed's package layout gives it (defined in `utils`)."""

from .utils import move_model_to_device

__all__ = ["move_model_to_device"]

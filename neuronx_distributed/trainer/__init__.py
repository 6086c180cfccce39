"""Upstream NxD's trainer API: a config, a parallel model and optimizer built from it, and tagged checkpoints.

    config = neuronx_distributed_config(tensor_parallel_size=2, optimizer_config={"zero_one_enabled": True})
    model = initialize_parallel_model(config, build_model)
    optimizer = initialize_parallel_optimizer(config, torch.optim.AdamW, model.parameters(), lr=1e-3)
    ... loss.backward(); optimizer.step(); optimizer.zero_grad()
    save_checkpoint("ckpts", tag="step_100", model=model, optimizer=optimizer, num_kept_ckpts=2)
"""

from .checkpoint import finalize_checkpoint, has_checkpoint, load_checkpoint, save_checkpoint
from .config import neuronx_distributed_config
from .model import NxDModel
from .optimizer import NxDOptimizer
from .trainer import initialize_parallel_model, initialize_parallel_optimizer

__all__ = [
    "NxDModel",
    "NxDOptimizer",
    "finalize_checkpoint",
    "has_checkpoint",
    "initialize_parallel_model",
    "initialize_parallel_optimizer",
    "load_checkpoint",
    "neuronx_distributed_config",
    "save_checkpoint",
]

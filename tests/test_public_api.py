"""Upstream NxD 2.x's import paths and package exports resolve here, as users' scripts spell them."""

from __future__ import annotations

import subprocess
import sys

import torch

from neuronx_distributed.parallel_layers import (
    copy_tensor_model_parallel_attributes,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
)

UPSTREAM_IMPORTS = """
from neuronx_distributed.parallel_layers import (
    ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, clip_grad_norm, initialize_model_parallel,
    copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region, scatter_to_tensor_model_parallel_region,
    get_xla_rng_tracker, model_parallel_xla_manual_seed, split_tensor_along_last_dim,
    set_tensor_model_parallel_attributes, copy_tensor_model_parallel_attributes,
    set_defaults_if_not_set_tensor_model_parallel_attributes, parallel_cross_entropy,
)
from neuronx_distributed.parallel_layers import layers, mappings, grads, loss_functions, random, layer_norm, utils
from neuronx_distributed.parallel_layers.layers import OutputChannelParallelConv2d, InputChannelParallelConv2d
from neuronx_distributed.parallel_layers.layer_norm import LayerNorm
from neuronx_distributed.parallel_layers.loss_functions import parallel_cross_entropy as loss
from neuronx_distributed.parallel_layers.grads import allreduce_sequence_parallel_gradients
from neuronx_distributed.parallel_layers.utils import divide, get_local_world_size, requires_init_pg_override
from neuronx_distributed.parallel_layers.utils import move_model_to_device
from neuronx_distributed.parallel_layers.mappings import (
    scatter_to_sequence_parallel_region, gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from neuronx_distributed.parallel_layers.parallel_state import (
    get_data_parallel_replica_groups, get_tensor_model_parallel_replica_groups, get_data_parallel_src_rank,
    get_world_group,
)
from neuronx_distributed.utils import cpu_mode, mark_step, get_device, master_print
from neuronx_distributed.utils.model_utils import init_on_device
import neuronx_distributed
assert neuronx_distributed.utils.cpu_mode() is True
assert loss is parallel_cross_entropy and mappings.copy_to_tensor_model_parallel_region is copy_to_tensor_model_parallel_region
print("ok")
"""


def test_upstream_import_paths_resolve_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", UPSTREAM_IMPORTS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_attribute_helpers_keep_an_existing_marking_and_copy_it():
    sharded = torch.zeros(4)
    set_tensor_model_parallel_attributes(sharded, True, 0, 2, 4)
    set_defaults_if_not_set_tensor_model_parallel_attributes(sharded)
    assert (sharded.tensor_model_parallel, sharded.partition_dim, sharded.partition_stride) == (True, 0, 2)

    plain = torch.zeros(4)
    set_defaults_if_not_set_tensor_model_parallel_attributes(plain)
    assert (plain.tensor_model_parallel, plain.partition_dim, plain.partition_stride, plain.num_partitions) == (
        False, -1, 1, 1,
    )

    copy = torch.zeros(4)
    copy_tensor_model_parallel_attributes(copy, sharded)
    assert (copy.tensor_model_parallel, copy.partition_dim, copy.partition_stride, copy.num_partitions) == (
        True, 0, 2, 4,
    )

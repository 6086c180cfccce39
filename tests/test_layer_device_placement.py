"""Where the parallel layers put their parameters, how they initialize them, and that no step reads back to the host.

- `exact_slice_init=True` builds the full master on the layer's device (every tensor made
  while building is on that device) and keeps exactly the TP=1 layer's slice.
- `exact_slice_init=False` allocates only the shard on the device and draws it from the
  tracker's per-TP-rank stream; the default picks exact on CPU and the shard elsewhere.
- On `device="meta"` every tensor made while building is a meta tensor, with the shard's shape.
- Forward and backward of every layer issue no op that reads a tensor back to the host
  (`.item()`, `int(t)`, `bool(t)`, data-dependent shapes), recorded by a dispatch mode
  (device-generic), and run on meta tensors, where any such read raises.

Each test takes a device: cpu, plus cuda where it is available.
"""

from __future__ import annotations

import pytest
import torch
from models import MLP, SelfAttention, SequenceParallelMLP
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from neuronx_distributed import comm, parallel_state
from neuronx_distributed.errors import LayerConfigError, RNGStateTrackerError
from neuronx_distributed.parallel_layers import (
    ColumnParallelLinear,
    InputChannelParallelConv2d,
    OutputChannelParallelConv2d,
    ParallelEmbedding,
    RowParallelLinear,
)
from neuronx_distributed.parallel_layers.pad import pad_model
from neuronx_distributed.parallel_layers.random import get_rng_state_tracker, model_parallel_xla_manual_seed

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HIDDEN, ODD, VOCAB, BATCH, SEQ = 8, 7, 13, 2, 4

# Ops that read a tensor's values back to the host or make a shape from them.
_HOST_READS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive"}


class _OpRecorder(TorchDispatchMode):
    """Records every op's name and the devices of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.host_reads, self.devices, self.largest = [], set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and len(args) > 1 and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1])
        )
        if name in _HOST_READS or bool_index:
            self.host_reads.append(str(func))
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.devices |= {t.device.type for t in tensors}
        self.largest = max([self.largest, *(t.numel() for t in tensors)])
        return out


def _tp():
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_size()


def _builders(device, **options):
    """Every layer kind, padded where the TP size does not divide 7."""
    return {
        "column_gather": lambda: ColumnParallelLinear(HIDDEN, ODD, pad=True, device=device, **options),
        "column_sharded": lambda: ColumnParallelLinear(HIDDEN, ODD, pad=True, gather_output=False, device=device, **options),
        "row": lambda: RowParallelLinear(ODD, HIDDEN, pad=True, device=device, **options),
        "embedding": lambda: ParallelEmbedding(VOCAB, HIDDEN, padding_idx=1, pad=True, device=device, **options),
        "embedding_dim": lambda: ParallelEmbedding(
            VOCAB, ODD, pad=True, shard_across_embedding=True, device=device, **options
        ),
        "conv_out": lambda: OutputChannelParallelConv2d(2, 4, 3, device=device, **options),
        "conv_in": lambda: InputChannelParallelConv2d(4, 2, 3, device=device, **options),
    }


def _case_meta_builds_shards_only():
    rank, size = _tp()
    for exact in (None, True, False):
        for name, build in _builders("meta", exact_slice_init=exact).items():
            with _OpRecorder() as recorder:
                layer = build()
            assert recorder.devices <= {"meta"}, (name, exact, recorder.devices)
            for param in layer.parameters():
                assert param.device.type == "meta", name
    padded = ODD + (-ODD % size)
    column = ColumnParallelLinear(HIDDEN, ODD, pad=True, gather_output=False, device="meta")
    assert tuple(column.weight.shape) == (padded // size, HIDDEN) and tuple(column.bias.shape) == (padded // size,)
    assert (column.weight.tensor_model_parallel, column.weight.partition_dim) == (True, 0)
    row = RowParallelLinear(ODD, HIDDEN, pad=True, device="meta")
    assert tuple(row.weight.shape) == (HIDDEN, padded // size) and tuple(row.bias.shape) == (HIDDEN,)
    embedding = ParallelEmbedding(VOCAB, HIDDEN, pad=True, device="meta")
    assert tuple(embedding.weight.shape) == ((VOCAB + (-VOCAB % size)) // size, HIDDEN)
    return True


def _case_exact_init_on_device(device):
    rank, size = _tp()
    torch.manual_seed(3)
    reference = nn.Linear(HIDDEN, 4 * size, device=device)
    torch.manual_seed(3)
    with _OpRecorder() as recorder:
        layer = ColumnParallelLinear(HIDDEN, 4 * size, gather_output=False, device=device, exact_slice_init=True)
    assert recorder.devices == {device}  # the master was built on the device, not on the host
    assert torch.equal(layer.weight, reference.weight.chunk(size)[rank])
    assert torch.equal(layer.bias, reference.bias.chunk(size)[rank])
    return True


def _case_shard_init_on_device(device):
    rank, size = _tp()
    model_parallel_xla_manual_seed(4)
    with _OpRecorder() as recorder:
        column = ColumnParallelLinear(HIDDEN, 4 * size + 1, pad=True, gather_output=False, device=device,
                                      exact_slice_init=False)
        row = RowParallelLinear(4 * size, HIDDEN, device=device, exact_slice_init=False)
        embedding = ParallelEmbedding(4 * size, HIDDEN, padding_idx=0, device=device, exact_slice_init=False)
    assert recorder.devices == {device}
    # No full master: the largest tensor made is a shard (the full weights have 2 or more times as many entries).
    per_rank = 4 + 1  # 4 * size + 1 padded to 4 * size + size
    assert tuple(column.weight.shape) == (per_rank, HIDDEN) and column.weight.device.type == device
    assert recorder.largest == column.weight.numel()
    # The default initializations draw from torch.nn.Linear's range for the full layer's fan-in.
    bound = HIDDEN ** -0.5
    assert column.weight.abs().max() <= bound and row.weight.abs().max() <= (4 * size) ** -0.5
    real = column.output_size - column.pad_size - rank * per_rank
    assert not column.weight[max(real, 0):].any() and not column.bias[max(real, 0):].any()
    # The shards are drawn per TP rank (different numbers), the replicated bias alike on every rank.
    weights = comm.all_gather(row.weight.detach().unsqueeze(0), dim=0)
    assert not torch.equal(weights[0], weights[1])
    biases = comm.all_gather(row.bias.detach().unsqueeze(0), dim=0)
    assert all(torch.equal(bias, biases[0]) for bias in biases)
    if rank == 0:
        assert not embedding.weight[0].any()
    # Reseeding reproduces the shard; without a seeded tracker a typed error says what to do.
    model_parallel_xla_manual_seed(4)
    again = ColumnParallelLinear(HIDDEN, 4 * size + 1, pad=True, gather_output=False, device=device,
                                 exact_slice_init=False)
    assert torch.equal(again.weight, column.weight)
    get_rng_state_tracker().reset()
    with pytest.raises(RNGStateTrackerError, match="exact_slice_init=True"):
        ColumnParallelLinear(HIDDEN, 4 * size, device=device, exact_slice_init=False)
    with pytest.raises(LayerConfigError, match="keep_master_weight"):
        ColumnParallelLinear(HIDDEN, 4 * size, device=device, exact_slice_init=False, keep_master_weight=True)
    with pytest.raises(LayerConfigError, match="exact_slice_init"):
        RowParallelLinear(4 * size, HIDDEN, device=device, exact_slice_init="yes")
    return True


class _SigmoidMLP(MLP):
    """An MLP whose activation is not zero at zero: the padded features reach fc2's input."""

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def _models(device):
    size = parallel_state.get_tensor_model_parallel_size()
    attention = SelfAttention(4 * 3, 3, parallel=True).to(device)  # 3 heads of 4, padded to a multiple of the TP size
    pad_model(attention, size, 3, pad_hook_fn=lambda module, ratio: setattr(module, "heads", 4 // size) if isinstance(
        module, SelfAttention) else None)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, device=device)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=device)
    layers = {name: build() for name, build in _builders(device).items()}
    inputs = {"column_gather": hidden, "column_sharded": hidden, "row": torch.randn(BATCH, SEQ, ODD, device=device),
              "embedding": ids, "embedding_dim": ids,
              "conv_out": torch.randn(1, 2, 5, 5, device=device), "conv_in": torch.randn(1, 4, 5, 5, device=device)}
    cases = [(layers[name], inputs[name]) for name in layers]
    cases += [
        (ParallelEmbedding(VOCAB, HIDDEN, max_norm=0.5, pad=True, device=device), ids),
        (_SigmoidMLP(HIDDEN, ODD, parallel=True, pad=True).to(device), hidden),
        (SequenceParallelMLP(HIDDEN, 4 * size, parallel=True).to(device), torch.randn(2, BATCH, HIDDEN, device=device)),
        (attention, torch.randn(BATCH, SEQ, 12, device=device)),
    ]
    return cases


def _case_no_host_reads(device):
    for model, inputs in _models(device):
        inputs = inputs.requires_grad_() if inputs.is_floating_point() else inputs
        with _OpRecorder() as recorder:
            output = model(inputs)
            output.sum().backward()
        assert not recorder.host_reads, (type(model).__name__, recorder.host_reads)
    return True


def _case_meta_forward_backward():
    """At TP=1 (no collectives) every layer runs forward and backward on meta tensors, where a host read raises."""
    for name, build in _builders("meta").items():
        layer = build()
        if name.startswith("conv"):
            inputs = torch.empty(1, layer.in_channels, 5, 5, device="meta", requires_grad=True)
        elif name.startswith("embedding"):
            inputs = torch.empty(BATCH, SEQ, dtype=torch.long, device="meta")
        else:
            inputs = torch.empty(BATCH, SEQ, layer.input_size - getattr(layer, "pad_size", 0), device="meta",
                                 requires_grad=True)
        layer(inputs).sum().backward()
        assert layer.weight.grad.device.type == "meta" and layer.weight.grad.shape == layer.weight.shape
    return True


def test_meta_device_allocates_only_meta_shards(pools):
    assert pools.run(2, 2, _case_meta_builds_shards_only) == [True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_exact_slice_init_builds_the_master_on_the_device(pools, device):
    assert pools.run(2, 2, _case_exact_init_on_device, device) == [True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_shard_init_allocates_and_draws_only_the_shard(pools, device):
    assert pools.run(2, 2, _case_shard_init_on_device, device) == [True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_never_read_back_to_the_host(pools, device):
    assert pools.run(2, 2, _case_no_host_reads, device) == [True, True]


def test_layers_run_forward_and_backward_on_meta_tensors(pools):
    assert pools.run(2, 1, _case_meta_forward_backward) == [True, True]

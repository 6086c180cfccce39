"""neuronx_distributed.utils: upstream's process helpers, its logger and init_on_device."""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
import torch
from torch import nn

from neuronx_distributed import utils
from neuronx_distributed.parallel_layers import ColumnParallelLinear, move_model_to_device
from neuronx_distributed.utils import model_utils
from neuronx_distributed.utils.logger import get_logger
from neuronx_distributed.utils.model_utils import init_on_device


def test_cpu_mode_and_mark_step():
    assert utils.cpu_mode() is True
    assert utils.mark_step() is None


def test_get_device_is_this_process_device(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if torch.cuda.is_available():
        assert utils.get_device() == torch.device("cuda", torch.cuda.current_device())
        monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
        assert utils.get_device() == torch.device("cuda", torch.cuda.device_count() - 1)
    else:
        assert utils.get_device() == torch.device("cpu")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert utils.get_device() == torch.device("cpu")  # no accelerator: LOCAL_RANK does not matter


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _print_and_log():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        utils.master_print("from master_print")
    records = {}
    for rank0_only in (True, False):
        logger = get_logger("nxd_test", rank0_only=rank0_only)
        handler = _Records()
        logger.addHandler(handler)
        logger.info("hello %s", "there")
        logger.debug("below INFO")
        logger.removeHandler(handler)
        records[rank0_only] = handler.messages
    return printed.getvalue(), records


def test_master_print_and_rank0_only_logger(pools):
    (rank0_printed, rank0_records), (rank1_printed, rank1_records) = pools.run(2, 1, _print_and_log)
    assert rank0_printed == "from master_print\n" and rank1_printed == ""
    assert rank0_records == {True: ["hello there"], False: ["hello there"]}
    assert rank1_records == {True: [], False: ["hello there"]}


def test_get_logger_returns_one_configured_logger():
    logger = get_logger()
    assert logger is get_logger() and logger is not get_logger(rank0_only=False)
    assert len(logger.handlers) == 1 and not logger.propagate and logger.level == logging.INFO


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def test_init_on_device_puts_parameters_on_meta_and_buffers_only_when_asked():
    with init_on_device(torch.device("meta")):
        model = _Model()
        scratch = torch.zeros(1)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"cpu"} and scratch.device.type == "cpu"
    assert not model.frozen.requires_grad and model.linear.weight.requires_grad
    assert type(model.frozen) is nn.Parameter

    with init_on_device("meta", include_buffers=True, force_custom_init_on_device=True):
        model = _Model()
        scratch = torch.zeros(1)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"} and scratch.device.type == "meta"

    # Outside the block, modules are built as usual again.
    assert _Model().linear.weight.device.type == "cpu" and torch.zeros(1).device.type == "cpu"


def test_init_on_device_restores_on_error():
    with pytest.raises(RuntimeError), init_on_device("meta", include_buffers=True):
        raise RuntimeError
    assert _Model().linear.weight.device.type == "cpu"


def _parallel_layer_on_meta():
    with init_on_device("meta"):
        layer = ColumnParallelLinear(8, 16, gather_output=False)
    return layer.weight.device.type, layer.weight.tensor_model_parallel, layer.weight.partition_dim, tuple(layer.weight.shape)


def test_init_on_device_keeps_tensor_parallel_attributes(pools):
    results = pools.run(2, 2, _parallel_layer_on_meta)
    assert results == [("meta", True, 0, (8, 8))] * 2


def test_model_utils_move_model_to_device_is_the_parallel_layers_one():
    assert model_utils.move_model_to_device is move_model_to_device

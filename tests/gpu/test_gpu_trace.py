"""A traced TP=2 model called with inputs on the test device.

Traced models run on CPU worker processes (gloo, shared-memory inputs and outputs):
a call copies device inputs to the host, and the outputs come back as CPU tensors,
equal to the eager model's on the device.
"""

from __future__ import annotations

import torch
from test_trace import TOL, _example_input, build_block

from neuronx_distributed.parallel_layers import move_model_to_device
from neuronx_distributed.trace import parallel_model_load, parallel_model_save, parallel_model_trace


def test_traced_tp2_model_takes_device_inputs(device, tmp_path):
    x = _example_input().to(device)
    with torch.inference_mode():
        expected = move_model_to_device(build_block(parallel=False), device).eval()(x)
    with parallel_model_trace(build_block, _example_input(), tp_degree=2) as model:
        outputs = model(x)
        parallel_model_save(model, tmp_path / "traced")
    with parallel_model_load(tmp_path / "traced") as loaded:
        reloaded = loaded(x)
    for name, value in expected.items():
        for got in (outputs[name], reloaded[name]):
            assert got.device.type == "cpu", "traced models return host tensors"
            torch.testing.assert_close(got, value.cpu(), **TOL)

"""Llama training step at TP=1 and TP=2: tokens/s and parameter + activation bytes per rank, ours next to PyTorch's.

    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/llama_tp.py \\
        [--width full|half] [--num_layers 2] [--seq_len 256] [--global_batch 2] [--steps 3] [--warmup 1]

The model is the Llama example's `1b` preset (Llama 3.2 1B's shape: hidden 2048,
MLP 8192, 32 query and 8 KV heads; the example's padded 30,592-id vocabulary,
untied embeddings) trimmed to --num_layers decoder layers and, with --width half,
half its hidden, MLP and head counts. Every variant builds the same Hugging Face
LlamaForCausalLM from one seed, on the same 2 processes over gloo, in one run:

  - nxd TP=1 x DP=2: the unsharded model on each rank, half the global batch
    each, gradients averaged with parallel_layers.all_reduce_gradients.
  - nxd TP=2: `neuronx_distributed.tp_plan.parallelize` of the model's own tp_plan
    with the lm_head's logits kept vocabulary-sharded, loss by parallel_cross_entropy
    (the Llama example's model and loss); "+ SP" is `parallelize(...,
    sequence_parallel=True)` with the norms' gradients summed by
    grads.allreduce_sequence_parallel_gradients; "+ AC" wraps every decoder layer with
    utils.activation_checkpoint.apply_activation_checkpointing.
  - torch TP=2: torch.distributed.tensor.parallel.parallelize_module of the same
    HF model with ColwiseParallel / RowwiseParallel on the same modules (the
    embedding vocabulary-sharded, lm_head output Shard(-1)) and its loss_parallel()
    cross entropy; "+ SP" adds SequenceParallel on the RMSNorms with the sequence
    (dim 1) sharded between the regions (PrepareModuleInput before attention and MLP,
    RowwiseParallel(output_layouts=Shard(1)), the embedding's output Shard(1)) and
    reduces the norms' Partial gradients; "+ AC" is torch's apply_activation_checkpointing
    (non-reentrant checkpoint_wrapper) on every decoder layer.

A step is forward, loss (mean next-token cross entropy over the global batch),
backward, gradient reduction and AdamW; tokens/s is the global batch's tokens over
the median step time (after --warmup steps, between barriers, as rank 0 sees it).
"params" is this rank's parameter bytes; "activations" is the memory held for
backward at the end of the forward and loss: every tensor that autograd saves
(torch.autograd.graph.saved_tensors_hooks), each storage counted once, parameters
left out, plus with activation checkpointing the decoder layers' inputs that the
checkpoint keeps. "loss" is step 1's loss: every variant computes the same one.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from neuronx_distributed.parallel_layers import all_reduce_gradients, parallel_state
from neuronx_distributed.parallel_layers.grads import allreduce_sequence_parallel_gradients
from neuronx_distributed.utils.activation_checkpoint import apply_activation_checkpointing
from sequence_parallel import _local  # the benchmark beside this one: a DTensor's or collective's local tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "training" / "llama"))
from llama_model import build_llama, build_parallel_llama, causal_lm_loss_sum, llama_config  # noqa: E402

BERT_VOCAB_SIZE = 30522  # the example's tokenizer (padded to 30,592 by llama_config)
SEED = 1234
MIB = 2**20


def benchmark_config(width: str, num_layers: int, seq_len: int):
    config = llama_config("1b", BERT_VOCAB_SIZE, seq_len, num_layers)
    if width == "half":
        config.hidden_size //= 2
        config.intermediate_size //= 2
        config.num_attention_heads //= 2
        config.num_key_value_heads //= 2
    return config


class SavedActivations:
    """Bytes autograd saves during the forward (parameters excluded), plus checkpointed layers' kept inputs."""

    def __init__(self, model, checkpointed_layers):
        self.bytes = 0
        self._seen = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
        self._hooks = [layer.register_forward_pre_hook(self._layer_input) for layer in checkpointed_layers]

    def _count(self, tensor) -> None:
        storage = _local(tensor).untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()

    def _layer_input(self, module, args) -> None:
        self._count(args[0])

    def pack(self, tensor):
        self._count(tensor)
        return tensor

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def decoder_layers(model):
    return [module for module in model.modules() if isinstance(module, LlamaDecoderLayer)]


def nxd_variant(config, tp: int, sequence_parallel: bool, activation_checkpointing: bool):
    """(model, loss function, gradient reduction given the optimizer) of our layout."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model = build_parallel_llama(config, SEED, sequence_parallel)
    if activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, LlamaDecoderLayer))
    if tp == 1:
        return model, causal_lm_loss_sum, lambda optimizer: all_reduce_gradients(model.parameters())
    return model, causal_lm_loss_sum, allreduce_sequence_parallel_gradients  # a no-op without SP-marked parameters


def torch_plan(sequence_parallel: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    layer = "model.layers.*."
    plan = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        **{layer + f"self_attn.{name}_proj": ColwiseParallel() for name in ("q", "k", "v")},
        layer + "self_attn.o_proj": RowwiseParallel(),
        layer + "mlp.gate_proj": ColwiseParallel(),
        layer + "mlp.up_proj": ColwiseParallel(),
        layer + "mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        plan.update({
            "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            layer + "input_layernorm": SequenceParallel(),
            layer + "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()}
            ),
            layer + "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            layer + "post_attention_layernorm": SequenceParallel(),
            layer + "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            layer + "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        })  # fmt: skip
    return plan


def torch_loss_sum(model, samples: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss from PyTorch's vocabulary-sharded logits (loss_parallel); positions passed
    explicitly, since under SP the model sees its local share of the sequence."""
    from torch.distributed.tensor.parallel import loss_parallel

    inputs, labels = samples[:, :-1], samples[:, 1:]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0)
    logits = model.lm_head(model.model(input_ids=inputs, position_ids=positions).last_hidden_state)
    with loss_parallel():
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def torch_variant(config, sequence_parallel: bool, activation_checkpointing: bool, mesh):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.tensor import DTensor, Partial, Replicate
    from torch.distributed.tensor.parallel import parallelize_module

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)  # unused by torch; keeps teardown uniform
    model = parallelize_module(build_llama(config, SEED), mesh, torch_plan(sequence_parallel))
    if activation_checkpointing:
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda module: isinstance(module, LlamaDecoderLayer),
        )

    def reduce(optimizer):  # the SP norms' gradients are Partial sums: make them whole, as our SP all-reduce does
        for param in model.parameters():
            if isinstance(param.grad, DTensor) and any(isinstance(p, Partial) for p in param.grad.placements):
                param.grad = param.grad.redistribute(placements=[Replicate()])

    return model, torch_loss_sum, reduce


def backward(loss: torch.Tensor, library: str) -> None:
    if library == "torch":
        from torch.distributed.tensor.parallel import loss_parallel

        with loss_parallel():
            loss.backward()
    else:
        loss.backward()


def run_variant(name: str, library: str, tp: int, sequence_parallel: bool, activation_checkpointing: bool,
                config, args, mesh) -> dict:
    torch.manual_seed(SEED)
    samples = torch.randint(0, BERT_VOCAB_SIZE, (args.global_batch, args.seq_len + 1))
    dp = dist.get_world_size() // tp
    if dp > 1:  # this replica's share of the global batch
        samples = samples.chunk(dp)[dist.get_rank() // tp]
    if library == "nxd":
        model, loss_sum, reduce = nxd_variant(config, tp, sequence_parallel, activation_checkpointing)
    else:
        model, loss_sum, reduce = torch_variant(config, sequence_parallel, activation_checkpointing, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    global_tokens = args.global_batch * args.seq_len

    def step(saved: SavedActivations | None = None):
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if saved else contextlib.nullcontext()
        with hooks:
            loss = loss_sum(model, samples) / global_tokens
        if saved:
            saved.close()
        backward(loss * dp, library)  # all_reduce_gradients averages over DP; the loss is the replicas' sum
        reduce(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = _local(loss.detach()).clone()
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        return loss.item()

    saved = SavedActivations(model, decoder_layers(model) if activation_checkpointing else [])
    first_loss = step(saved)
    times = []
    for index in range(args.warmup + args.steps - 1):
        dist.barrier()
        started = time.perf_counter()
        step()
        dist.barrier()
        if index >= args.warmup - 1:
            times.append(time.perf_counter() - started)
    param_bytes = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    parallel_state.destroy_model_parallel()
    return dict(
        variant=f"{library} {name}",
        tokens_per_s=global_tokens / statistics.median(times),
        param_mib=param_bytes / MIB,
        activation_mib=saved.bytes / MIB,
        loss=first_loss,
    )


VARIANTS = (  # (name, library, TP, sequence parallel, activation checkpointing)
    ("TP=1 x DP=2", "nxd", 1, False, False),
    ("TP=2", "nxd", 2, False, False),
    ("TP=2 + AC", "nxd", 2, False, True),
    ("TP=2 + SP + AC", "nxd", 2, True, True),
    ("TP=2", "torch", 2, False, False),
    ("TP=2 + AC", "torch", 2, False, True),
    ("TP=2 + SP + AC", "torch", 2, True, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", choices=("full", "half"), default="full")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--global_batch", type=int, default=2, help="Sequences per step (even: TP=1 x DP=2 splits it).")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per variant.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first (the first also measures memory).")
    args = parser.parse_args()
    if args.global_batch % 2 or args.steps < 1 or args.warmup < 1 or args.num_layers < 1:
        parser.error("--global_batch must be even, and --steps, --warmup and --num_layers at least 1.")
    dist.init_process_group("gloo")
    if dist.get_world_size() != 2:
        raise SystemExit("run with torchrun --nproc_per_node=2 (the table compares TP=2 with TP=1 x DP=2).")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    config = benchmark_config(args.width, args.num_layers, args.seq_len)
    rows = [run_variant(*variant, config, args, mesh) for variant in VARIANTS]
    if dist.get_rank() == 0:
        print(
            f"Llama-1B shape ({args.width} width: hidden {config.hidden_size}, MLP {config.intermediate_size}, "
            f"{config.num_attention_heads}/{config.num_key_value_heads} heads, {config.num_hidden_layers} layers, "
            f"vocab {config.vocab_size}), global batch {args.global_batch} x {args.seq_len} tokens, fp32, "
            f"2 CPU processes over gloo, {args.steps} timed steps after {args.warmup}"
        )
        header = f"| {'variant':<22} | {'tokens/s':>9} | {'params MiB/rank':>15} | {'activations MiB/rank':>20} | {'loss':>9} |"
        print(header)
        print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
        for row in rows:
            print(
                f"| {row['variant']:<22} | {row['tokens_per_s']:>9.1f} | {row['param_mib']:>15.1f} | "
                f"{row['activation_mib']:>20.1f} | {row['loss']:>9.6f} |"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

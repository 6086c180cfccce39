"""Llama pretraining with tensor x data parallelism: Hugging Face's LlamaForCausalLM made parallel by `parallelize`.

    python examples/training/llama/build_causal_lm_data.py --output_dir ~/examples_datasets/llama_owntext
    torchrun --nproc_per_node=2 examples/training/llama/tp_zero1_llama_hf_pretrain.py \\
        --tensor_parallel_size 2 --model_config tiny --data_dir ~/examples_datasets/llama_owntext \\
        --output_dir out_tp2 --batch_size 8 --grad_accum_usteps 2 --steps_this_run 100

and its data-parallel counterpart, drawn on the same figure:

    torchrun --nproc_per_node=2 examples/training/llama/tp_zero1_llama_hf_pretrain.py \\
        --tensor_parallel_size 1 --model_config tiny --data_dir ~/examples_datasets/llama_owntext \\
        --output_dir out_dp2 --batch_size 4 --grad_accum_usteps 2 --steps_this_run 100 --compare_with out_tp2/metrics.csv

The data-parallel degree is the number of processes divided by
--tensor_parallel_size; the global batch is batch_size x grad_accum_usteps x DP
sequences of --seq_len tokens. Runs on CUDA (NCCL) when a GPU is visible, else on
CPU (gloo). --model_config tiny|1b|8b picks the shape (1b and 8b are Llama 3.2 1B
and Llama 3 8B; they need the memory: fp32 weights plus AdamW state are 16 bytes
per parameter, divided by TP and, with --zero1, the optimizer part by DP;
--num_layers trims them).

It trains through upstream NxD's trainer API: `neuronx_distributed_config`
(ZeRO-1 with --zero1, clipping at a global norm of 1.0, activation checkpointing
of every decoder layer with --activation_checkpointing), `initialize_parallel_model`
(the model of llama_model.py, sharded by `parallelize`), `initialize_parallel_optimizer`
(AdamW; its step averages the gradients over DP and clips them, or with ZeRO-1
reduce-scatters them and steps 1/DP of the state) and `save_checkpoint` /
`load_checkpoint`. The loss of a micro-batch is its summed token losses divided by
the number of tokens in the global batch; AdamW runs with a linear warm-up and
decay. With the same seed and global batch every TP x DP layout computes the same
losses (there is no dropout). --sequence_parallel (TP > 1) cuts the sequence
between the decoder layers' projections (`parallelize(..., sequence_parallel=True)`,
`sequence_parallel=True` in the config so the optimizer sums the norms' gradients
over TP); --seq_len must then be a multiple of --tensor_parallel_size.

Writes to --output_dir: metrics.csv (one row per optimizer step; on resume the
rows after the checkpoint are dropped), loss.png (this run, plus any
--compare_with runs), config.json, and tagged checkpoints `checkpoint/step_N/`
(every --checkpoint_every steps and at the end, the newest --num_kept_checkpoint
kept). --resume continues from the newest exactly: the model, AdamW's state (per
DP rank with ZeRO-1), the schedule and the data position.
`nxd checkpoint merge checkpoint/step_N/model merged/` and config.json make a
folder that `LlamaForCausalLM.from_pretrained` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.optimization import get_linear_schedule_with_warmup

from causal_lm_data import TokenSequences
from llama_model import MODEL_CONFIGS, build_parallel_llama, causal_lm_loss_sum, llama_config, parameter_bytes
from neuronx_distributed.parallel_layers import parallel_state
from neuronx_distributed.trainer import (
    has_checkpoint,
    initialize_parallel_model,
    initialize_parallel_optimizer,
    load_checkpoint,
    neuronx_distributed_config,
    save_checkpoint,
)
from neuronx_distributed.utils import get_device

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the examples' shared metrics file and loss plot
from training_metrics import MetricsFile, plot_losses  # noqa: E402

MAX_GRAD_NORM = 1.0
NO_WEIGHT_DECAY = ("bias", "norm")  # the RMSNorm weights (input_layernorm, post_attention_layernorm, norm)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="~/examples_datasets/llama_owntext",
                        help="Folder with tokens.npy and metadata.json (build_causal_lm_data.py makes it).")
    parser.add_argument("--output_dir", default="./output", help="Metrics, loss plot and checkpoint.")
    parser.add_argument("--tensor_parallel_size", type=int, default=1)
    parser.add_argument("--model_config", choices=sorted(MODEL_CONFIGS), default="tiny")
    parser.add_argument("--num_layers", type=int, default=None, help="Decoder layers (default: the preset's).")
    parser.add_argument("--seq_len", type=int, default=128, help="Tokens per sequence.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per micro-step per data-parallel replica.")
    parser.add_argument("--grad_accum_usteps", type=int, default=1, help="Micro-steps per optimizer step.")
    parser.add_argument("--steps_this_run", type=int, default=100, help="Optimizer steps this run (stops early at --max_steps).")
    parser.add_argument("--max_steps", type=int, default=10000, help="Length of the learning-rate schedule, in optimizer steps.")
    parser.add_argument("--warmup_steps", type=int, default=100, help="Linear warm-up steps of the learning rate.")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--beta2", type=float, default=0.95)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=12349)
    parser.add_argument("--activation_checkpointing", action="store_true",
                        help="Recompute each decoder layer's activations in backward instead of keeping them.")
    parser.add_argument("--sequence_parallel", action="store_true",
                        help="Megatron-style sequence parallelism in the decoder layers (needs --tensor_parallel_size > 1).")
    parser.add_argument("--zero1", "--use_zero_1", dest="zero1", action="store_true",
                        help="ZeRO-1: each data-parallel rank keeps 1/DP of AdamW's state (NeuronZero1Optimizer).")
    parser.add_argument("--checkpoint_every", "--checkpoint_freq", dest="checkpoint_every", type=int, default=0,
                        help="Save every this many steps (0: only at the end).")
    parser.add_argument("--final_checkpoint", action=argparse.BooleanOptionalAction, default=True,
                        help="Save at the end of the run (--no-final_checkpoint for benchmarks).")
    parser.add_argument("--num_kept_checkpoint", type=int, default=2, help="Checkpoints kept (older ones removed; -1: all).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the newest checkpoint in --output_dir/checkpoint (or --checkpoint_dir).")
    parser.add_argument("--checkpoint_dir", default=None, help="Where checkpoints go (default: --output_dir/checkpoint).")
    parser.add_argument("--compare_with", nargs="+", default=[], metavar="METRICS_CSV",
                        help="metrics.csv files of other runs (e.g. the data-parallel counterpart) to draw on loss.png.")
    parser.add_argument("--disable_progress_bar", action="store_true")
    args = parser.parse_args(argv)
    for name in ("tensor_parallel_size", "seq_len", "batch_size", "grad_accum_usteps", "steps_this_run", "max_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.sequence_parallel and (args.tensor_parallel_size == 1 or args.seq_len % args.tensor_parallel_size):
        parser.error("--sequence_parallel needs --tensor_parallel_size > 1 dividing --seq_len.")
    if args.warmup_steps < 0 or args.checkpoint_every < 0:
        parser.error("--warmup_steps and --checkpoint_every must not be negative.")
    if args.num_kept_checkpoint < 1 and args.num_kept_checkpoint != -1:
        parser.error("--num_kept_checkpoint must be at least 1, or -1 for all.")
    for path in args.compare_with:
        if not os.path.isfile(path):
            parser.error(f"--compare_with {path}: no such file; pass the metrics.csv of a finished run.")
    return args


def build_optimizer(nxd_config, model, args):
    """AdamW (ZeRO-1 with --zero1) without weight decay on the norms, with its warm-up and decay schedule."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in NO_WEIGHT_DECAY)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if any(k in n for k in NO_WEIGHT_DECAY)], "weight_decay": 0.0},
    ]
    optimizer = initialize_parallel_optimizer(nxd_config, torch.optim.AdamW, groups, lr=args.lr, betas=(args.beta1, args.beta2))
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, batches, global_tokens: int, device, dp_group, dp_size: int):
    """One optimizer step over this replica's micro-batches; returns (global mean token loss, grad norm) as tensors.

    The optimizer averages the gradients over DP and clips their global norm (ZeRO-1: reduce-scatters them).
    """
    step_loss = torch.zeros((), device=device)
    for samples in batches:
        loss = causal_lm_loss_sum(model, samples.to(device, non_blocking=True)) / global_tokens
        # The optimizer averages the gradients over DP; the global loss is the sum of the replicas' parts.
        (loss * dp_size).backward()
        step_loss += loss.detach()
    dist.all_reduce(step_loss, group=dp_group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return step_loss, optimizer.grad_norm


def resume(checkpoint_dir, model, optimizer, scheduler) -> tuple[int, int]:
    if not has_checkpoint(checkpoint_dir):
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir} to resume from; train without --resume first, or pass --checkpoint_dir."
        )
    position = load_checkpoint(checkpoint_dir, model=model, optimizer=optimizer, scheduler=scheduler)
    return int(position["global_step"]), int(position["consumed_samples"])


def main(argv=None) -> None:
    args = parse_args(argv)
    nxd_config = neuronx_distributed_config(
        tensor_parallel_size=args.tensor_parallel_size,
        optimizer_config={"zero_one_enabled": args.zero1, "grad_clipping": True, "max_grad_norm": MAX_GRAD_NORM},
        # "full": every layer class in the model's _no_split_modules (LlamaDecoderLayer).
        activation_checkpoint_config="full" if args.activation_checkpointing else None,
        sequence_parallel=args.sequence_parallel,
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel_size)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dp_size, dp_rank = parallel_state.get_data_parallel_size(), parallel_state.get_data_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group()
    device = get_device()
    output_dir = os.path.expanduser(args.output_dir)
    checkpoint_dir = os.path.expanduser(args.checkpoint_dir or os.path.join(output_dir, "checkpoint"))
    os.makedirs(output_dir, exist_ok=True)

    data = TokenSequences(args.data_dir, args.seq_len, args.seed)
    config = llama_config(args.model_config, data.vocab_size, args.seq_len, args.num_layers)
    model = initialize_parallel_model(nxd_config, build_parallel_llama, False, config, args.seed, args.sequence_parallel)
    optimizer, scheduler = build_optimizer(nxd_config, model, args)

    step, consumed = 0, 0
    if args.resume:
        step, consumed = resume(checkpoint_dir, model, optimizer, scheduler)
    last_step = min(step + args.steps_this_run, args.max_steps)

    param_bytes = parameter_bytes(model)
    global_batch = args.batch_size * args.grad_accum_usteps * dp_size
    global_tokens = global_batch * args.seq_len
    label = f"TP={args.tensor_parallel_size} x DP={dp_size}" + " SP" * args.sequence_parallel + " ZeRO-1" * args.zero1 + " AC" * args.activation_checkpointing
    metrics = MetricsFile(os.path.join(output_dir, "metrics.csv"), resume_step=step) if rank == 0 else None
    if rank == 0:
        config.save_pretrained(output_dir)  # config.json: with a merged checkpoint, a Hugging Face model folder
        print(
            f"Llama-{args.model_config} ({config.num_hidden_layers} layers): {label} on {world_size} {device.type} "
            f"process(es); {param_bytes:,} parameter bytes per rank; global batch {global_batch} x {args.seq_len} "
            f"tokens; steps {step + 1}..{last_step}",
            flush=True,
        )
    progress = tqdm(total=last_step, initial=step, unit="step", disable=rank != 0 or args.disable_progress_bar)
    while step < last_step:
        started = time.perf_counter()
        batches = data.replica_micro_batches(consumed, args.batch_size, args.grad_accum_usteps, dp_size, dp_rank)
        learning_rate = scheduler.get_last_lr()[0]
        loss, grad_norm = train_step(model, optimizer, scheduler, batches, global_tokens, device, dp_group, dp_size)
        loss_value, grad_norm_value = loss.item(), grad_norm.item()
        elapsed = time.perf_counter() - started
        step, consumed = step + 1, consumed + global_batch
        if rank == 0:
            metrics.write(
                step=step,
                loss=f"{loss_value:.8f}",
                learning_rate=f"{learning_rate:.6e}",
                grad_norm=f"{grad_norm_value:.6f}",
                sequences_per_s=f"{global_batch / elapsed:.3f}",
                step_time_s=f"{elapsed:.4f}",
                param_bytes_per_rank=param_bytes,
            )
            progress.set_postfix(loss=f"{loss_value:.4f}", tokens_per_s=f"{global_tokens / elapsed:.0f}")
            progress.update()
        if args.checkpoint_every and step % args.checkpoint_every == 0 or step == last_step and args.final_checkpoint:
            position = {"global_step": step, "consumed_samples": consumed}
            save_checkpoint(checkpoint_dir, f"step_{step}", model, optimizer, scheduler, position,
                            num_kept_ckpts=args.num_kept_checkpoint)
    progress.close()

    if rank == 0:
        metrics.close()
        labels = [label] + [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.compare_with]
        plot = plot_losses([metrics.path, *args.compare_with], os.path.join(output_dir, "loss.png"), labels,
                           title=f"Llama-{args.model_config} pretraining loss", loss_label="loss (next-token cross-entropy)")
        print(f"metrics: {metrics.path}\nloss plot: {plot}", flush=True)
        if has_checkpoint(checkpoint_dir):
            print(f"checkpoints: {checkpoint_dir}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

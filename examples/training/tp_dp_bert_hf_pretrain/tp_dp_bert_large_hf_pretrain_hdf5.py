"""BERT pretraining with tensor x data parallelism: the seed's tutorial, on any torch.distributed backend.

    torchrun --nproc_per_node=2 tp_dp_bert_large_hf_pretrain_hdf5.py \\
        --tensor_parallel_degree 2 --steps_this_run 10 --batch_size 16 --grad_accum_usteps 32 \\
        --data_dir ~/examples_datasets/bert_pretrain_wikicorpus_tokenized_hdf5_seqlen128

The data-parallel degree is the number of processes divided by
--tensor_parallel_degree. Runs on CUDA (NCCL) when a GPU is visible, else on
CPU. Writes to --output_dir: metrics.csv (one row per optimizer step), loss.png,
config.json, and the sharded checkpoint `checkpoint/` (every --checkpoint_every
steps and at the end; --resume continues from it). With --zero1 the AdamW state
is sharded across the data-parallel replicas (ZeRO-1, NeuronZero1Optimizer),
and `checkpoint/` holds the trainer API's tagged checkpoints
(`neuronx_distributed.trainer.save_checkpoint`; the model of a tag is in
`checkpoint/<tag>/model`).

The loss of a step is the masked-LM cross entropy averaged over every masked
token of the global batch plus the next-sentence cross entropy averaged over
its sequences, however the global batch is split across replicas and
micro-steps: with dropout off and the same seed and global batch, every
TP x DP layout gives the same losses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers.optimization import get_linear_schedule_with_warmup

from neuronx_distributed import parallel_layers, trainer
from neuronx_distributed.optimizer import NeuronZero1Optimizer
from neuronx_distributed.parallel_layers import all_reduce_gradients, clip_grad_norm, move_model_to_device, parallel_state
from neuronx_distributed.parallel_layers.random import model_parallel_manual_seed
from parallel_bert import MODEL_CONFIGS, bert_config, build_parallel_bert, parameter_bytes
from pretraining_data import PretrainingDataError, create_pretraining_dataloader, training_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the examples' shared metrics file and loss plot
from training_metrics import MetricsFile, plot_losses  # noqa: E402

MAX_GRAD_NORM = 1.0
NO_WEIGHT_DECAY = ("bias", "LayerNorm")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data_dir",
        default="~/examples_datasets/bert_pretrain_wikicorpus_tokenized_hdf5_seqlen128/",
        help="Folder of *_training_*.hdf5 shards (build_pretraining_shards.py makes them).",
    )
    parser.add_argument("--output_dir", default="./output", help="Metrics, loss plot and checkpoint.")
    parser.add_argument("--tensor_parallel_degree", type=int, default=1)
    parser.add_argument("--model_config", choices=sorted(MODEL_CONFIGS), default="large")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per micro-step per data-parallel replica.")
    parser.add_argument("--grad_accum_usteps", type=int, default=64, help="Micro-steps per optimizer step.")
    parser.add_argument("--steps_this_run", type=int, default=128, help="Optimizer steps this run (stops early at --max_steps).")
    parser.add_argument("--max_steps", type=int, default=28125, help="Length of the learning-rate schedule, in optimizer steps.")
    parser.add_argument("--warmup_steps", type=int, default=2000, help="Linear warm-up steps of the learning rate.")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--dropout", type=float, default=0.1, help="Hidden and attention dropout (0 for loss parity checks).")
    parser.add_argument("--seq_len", type=int, default=None, help="If given, must match the shards' sequence length.")
    parser.add_argument("--max_pred_len", type=int, default=20, help="Masked positions per sequence in the shards.")
    parser.add_argument("--seed", type=int, default=12349)
    parser.add_argument("--checkpoint_every", type=int, default=0, help="Save every this many steps (0: only at the end).")
    parser.add_argument("--final_checkpoint", action=argparse.BooleanOptionalAction, default=True,
                        help="Save at the end of the run (--no-final_checkpoint for benchmarks).")
    parser.add_argument("--resume", "--resume_ckpt", dest="resume", action="store_true",
                        help="Continue from the checkpoint in --output_dir (or --resume_ckpt_path).")
    parser.add_argument("--resume_ckpt_path", default=None, help="Checkpoint folder to resume from.")
    parser.add_argument("--zero1", action="store_true",
                        help="Shard the optimizer state across the data-parallel replicas (ZeRO-1).")
    parser.add_argument("--disable_progress_bar", action="store_true")
    args = parser.parse_args(argv)
    for name in ("tensor_parallel_degree", "batch_size", "grad_accum_usteps", "steps_this_run", "max_steps", "max_pred_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.warmup_steps < 0 or args.checkpoint_every < 0:
        parser.error("--warmup_steps and --checkpoint_every must not be negative.")
    if not 0.0 <= args.dropout < 1.0:
        parser.error("--dropout must lie in [0, 1).")
    return args


def pretraining_loss_sums(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed masked-LM and next-sentence cross entropies of one micro-batch.

    The MLM head runs on the masked positions only (as NVIDIA's BERT does);
    position 0 is [CLS], so a zero position is padding.
    """
    input_ids, segment_ids, input_mask, masked_lm_positions, masked_lm_ids, next_sentence_labels = batch
    outputs = model.bert(input_ids=input_ids, attention_mask=input_mask, token_type_ids=segment_ids)
    hidden = outputs.last_hidden_state
    index = masked_lm_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    prediction_scores, seq_relationship_scores = model.cls(hidden.gather(1, index), outputs.pooler_output)
    mlm_labels = masked_lm_ids.masked_fill(masked_lm_positions == 0, -100)
    mlm_sum = F.cross_entropy(prediction_scores.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100, reduction="sum")
    nsp_sum = F.cross_entropy(seq_relationship_scores, next_sentence_labels, reduction="sum")
    return mlm_sum, nsp_sum


def micro_batches(args, position: dict):
    """Yield (position after this batch, batch) forever, from `position` = {epoch, file_index, batch_index}."""
    epoch, file_index, batch_index = position["epoch"], position["file_index"], position["batch_index"]
    while True:
        files = training_shards(args.data_dir, epoch, args.seed)
        for file_index in range(file_index, len(files)):
            loader = create_pretraining_dataloader(files[file_index], args.max_pred_len, args.batch_size, args.seed, epoch)
            if len(loader) == 0:
                raise PretrainingDataError(
                    f"{files[file_index]} holds {len(loader.dataset)} sequences, fewer than one batch per replica "
                    f"({args.batch_size} x {parallel_state.get_data_parallel_world_size()} replicas); build larger shards."
                )
            if args.seq_len is not None and args.seq_len != loader.dataset.sequence_length:
                raise PretrainingDataError(
                    f"--seq_len {args.seq_len} does not match the {loader.dataset.sequence_length} of {files[file_index]}."
                )
            for index, batch in enumerate(loader):
                if index >= batch_index:
                    yield {"epoch": epoch, "file_index": file_index, "batch_index": index + 1}, batch
            batch_index = 0
        file_index = 0
        epoch += 1


def build_optimizer(model, args):
    """AdamW without weight decay on biases and LayerNorm, built from named parameters (the checkpoint matches by name).

    With --zero1, ZeRO-1 over the same groups: it averages the gradients over the
    data-parallel group and clips them itself, inside `step()`.
    """
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if not any(k in n for k in NO_WEIGHT_DECAY)], "weight_decay": args.weight_decay},
        {"params": [(n, p) for n, p in named if any(k in n for k in NO_WEIGHT_DECAY)], "weight_decay": 0.0},
    ]
    if args.zero1:
        groups = [{**group, "params": [p for _, p in group["params"]]} for group in groups]
        optimizer = NeuronZero1Optimizer(groups, torch.optim.AdamW, grad_clipping=True, max_norm=MAX_GRAD_NORM, lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    return optimizer, scheduler


def step_seed(seed: int, dp_rank: int, step: int) -> int:
    """The dropout seed of one optimizer step on one replica (the same on its TP ranks), so resuming replays it.

    `model_parallel_manual_seed` gives it to the default generators (dropout on replicated activations)
    and, offset by the TP rank, to the tracker's stream (attention dropout on each rank's heads).
    """
    return hash((seed, dp_rank, step)) & 0x7FFF_FFFF


def train_step(model, optimizer, scheduler, batches, device, dp_group, dp_size: int):
    """One optimizer step over this replica's micro-batches; returns (global loss, grad norm) as tensors."""
    batches = [[t.to(device, non_blocking=True) for t in batch] for batch in batches]
    # Normalize by the global numbers of masked tokens and of sequences, so every layout computes the same loss.
    counts = torch.tensor(
        [sum(int((b[3] > 0).sum()) for b in batches), sum(len(b[0]) for b in batches)], dtype=torch.float64, device=device
    )
    dist.all_reduce(counts, group=dp_group)
    masked_tokens, sequences = counts.tolist()
    step_loss = torch.zeros((), device=device)
    for batch in batches:
        mlm_sum, nsp_sum = pretraining_loss_sums(model, batch)
        loss = mlm_sum / masked_tokens + nsp_sum / sequences
        # all_reduce_gradients averages over the DP group; the global loss is the sum of the replicas' parts.
        (loss * dp_size).backward()
        step_loss += loss.detach()
    dist.all_reduce(step_loss, group=dp_group)
    if isinstance(optimizer, NeuronZero1Optimizer):
        optimizer.step()  # reduce-scatters (averages) the gradients over DP and clips the global gradient
        grad_norm = optimizer.grad_norm
    else:
        all_reduce_gradients(model.parameters())  # sync over DP first, then clip the global gradient
        grad_norm = clip_grad_norm(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return step_loss, grad_norm


def save_checkpoint(path, model, optimizer, scheduler, step: int, position: dict) -> None:
    if isinstance(optimizer, NeuronZero1Optimizer):  # each replica's optimizer partition is saved too
        trainer.save_checkpoint(path, f"step_{step}", model=model, optimizer=optimizer, scheduler=scheduler,
                                user_content={"global_step": step, "data_position": position}, num_kept_ckpts=2)
        return
    parallel_layers.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "global_step": step,
            "data_position": position,
        },
        path,
    )


def has_checkpoint(path) -> bool:
    return os.path.exists(os.path.join(path, "manifest.json")) or trainer.has_checkpoint(path)


def resume(path, model, optimizer, scheduler) -> tuple[int, dict]:
    if not has_checkpoint(path):
        raise FileNotFoundError(f"no checkpoint at {path} to resume from; train without --resume first, or pass --resume_ckpt_path.")
    if isinstance(optimizer, NeuronZero1Optimizer):
        content = trainer.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
        return int(content["global_step"]), dict(content["data_position"])
    state = parallel_layers.load(path, model=model, model_key="model")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["global_step"]), dict(state["data_position"])


def main(argv=None) -> None:
    args = parse_args(argv)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel_degree)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    output_dir = os.path.expanduser(args.output_dir)
    checkpoint_dir = os.path.join(output_dir, "checkpoint")
    os.makedirs(output_dir, exist_ok=True)

    config = bert_config(args.model_config, args.dropout)
    model = build_parallel_bert(config, args.seed)
    move_model_to_device(model, device)
    model.train()
    optimizer, scheduler = build_optimizer(model, args)

    step, position = 0, {"epoch": 0, "file_index": 0, "batch_index": 0}
    if args.resume:
        step, position = resume(os.path.expanduser(args.resume_ckpt_path or checkpoint_dir), model, optimizer, scheduler)
    last_step = min(step + args.steps_this_run, args.max_steps)

    param_bytes = parameter_bytes(model)
    global_batch = args.batch_size * args.grad_accum_usteps * dp_size
    metrics = MetricsFile(os.path.join(output_dir, "metrics.csv"), resume_step=step) if rank == 0 else None
    if rank == 0:
        config.save_pretrained(output_dir)  # with `nxd checkpoint merge`'s model.safetensors: a Hugging Face model folder
        print(
            f"BERT-{args.model_config}: TP={args.tensor_parallel_degree} x DP={dp_size}{' ZeRO-1' if args.zero1 else ''} on {world_size} {device.type} "
            f"process(es); {param_bytes:,} parameter bytes per rank; global batch {global_batch}; "
            f"steps {step + 1}..{last_step}",
            flush=True,
        )
    progress = tqdm(total=last_step, initial=step, unit="step", disable=rank != 0 or args.disable_progress_bar)
    data = micro_batches(args, position)
    while step < last_step:
        started = time.perf_counter()
        batches = []
        for _ in range(args.grad_accum_usteps):
            position, batch = next(data)
            batches.append(batch)
        # Seeded after loading: a new DataLoader iterator draws from the default generator. Also seeds the
        # tracker's per-TP-rank stream, from which the attention dropout of each rank's heads draws.
        model_parallel_manual_seed(step_seed(args.seed, dp_rank, step))
        learning_rate = scheduler.get_last_lr()[0]
        loss, grad_norm = train_step(model, optimizer, scheduler, batches, device, dp_group, dp_size)
        loss_value, grad_norm_value = loss.item(), grad_norm.item()
        elapsed = time.perf_counter() - started
        step += 1
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
            progress.set_postfix(loss=f"{loss_value:.4f}", seq_per_s=f"{global_batch / elapsed:.1f}")
            progress.update()
        if args.checkpoint_every and step % args.checkpoint_every == 0 or step == last_step and args.final_checkpoint:
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, position)
    progress.close()

    if rank == 0:
        metrics.close()
        plot = plot_losses([metrics.path], os.path.join(output_dir, "loss.png"), [f"TP={args.tensor_parallel_degree} x DP={dp_size}"],
                           title="BERT pretraining loss", loss_label="loss (masked LM + next sentence)")
        print(f"metrics: {metrics.path}\nloss plot: {plot}", flush=True)
        if has_checkpoint(checkpoint_dir):
            print(f"checkpoint: {checkpoint_dir}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

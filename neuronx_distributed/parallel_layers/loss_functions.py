"""Cross entropy over vocabulary-sharded logits, without gathering the vocabulary.

The logits' last dimension is split across the tensor-parallel group in
contiguous shards, rank r holding vocabulary ids [r * V/tp, (r + 1) * V/tp): what
`ColumnParallelLinear(gather_output=False)` produces. Each rank reduces its shard
to a few numbers per token (its maximum, its sum of exponentials, the target's
logit when the target lies in its shard, and for label smoothing the sum of its
logits) and only those cross the group, in two all-reduces of `tokens x 1` and
`tokens x 2` (or `x 3` with smoothing) elements.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from ..errors import InputShapeError, LossInputError
from . import parallel_state


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit logits (exp and sums lose too much in half precision), else the logits' own dtype."""
    return torch.promote_types(dtype, torch.float32)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy; backward is (softmax - smoothed one-hot) * grad, masked at ignored tokens."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, target, label_smoothing, ignore_index, group):
        shard_size = vocab_parallel_logits.shape[-1]
        tp_size, tp_rank = dist.get_world_size(group), dist.get_rank(group)
        vocab_size = shard_size * tp_size
        vocab_start = tp_rank * shard_size

        # The global maximum, subtracted for a stable exp. A new tensor: the caller's logits stay as they were.
        logits_max = vocab_parallel_logits.detach().amax(dim=-1).to(_compute_dtype(vocab_parallel_logits.dtype))
        comm.all_reduce(logits_max, op="max", group=group)
        shifted = vocab_parallel_logits.detach().to(logits_max.dtype, copy=True)
        shifted.sub_(logits_max.unsqueeze(-1))

        in_shard = (target >= vocab_start) & (target < vocab_start + shard_size)
        local_target = torch.where(in_shard, target - vocab_start, 0).long()
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * in_shard
        logit_sum = [shifted.sum(dim=-1)] if label_smoothing > 0 else []
        probs = shifted.exp_()  # the shifted logits are not needed past this point
        # One all-reduce for the per-token sums: [sum of exp, target logit, (sum of logits when smoothing)].
        sums = comm.all_reduce(torch.stack([probs.sum(dim=-1), target_logit, *logit_sum], dim=-1), op="sum", group=group)

        log_normalizer = sums[..., 0].log()
        loss = log_normalizer - sums[..., 1]
        if label_smoothing > 0:
            # -sum_j q_j log p_j with q = (1 - eps) one_hot + eps / V, as torch.nn.functional.cross_entropy.
            mean_shifted_logit = sums[..., 2] / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_normalizer - mean_shifted_logit)
        counted = target != ignore_index
        # Out-of-range ids (refused up front on CPU, not checked on an accelerator: see parallel_cross_entropy)
        # give NaN, in the loss and the gradient, rather than the loss of a target logit of 0.
        outside = counted & ((target < 0) | (target >= vocab_size))
        loss = torch.where(counted, loss, torch.zeros_like(loss)).masked_fill(outside, float("nan"))

        probs.div_(sums[..., 0].unsqueeze(-1))
        ctx.save_for_backward(probs, local_target, in_shard, counted, outside)
        ctx.label_smoothing, ctx.vocab_size, ctx.logits_dtype = label_smoothing, vocab_size, vocab_parallel_logits.dtype
        return loss.to(vocab_parallel_logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        probs, local_target, in_shard, counted, outside = ctx.saved_tensors
        smoothing = ctx.label_smoothing
        weight = (grad_output.to(probs.dtype) * counted).masked_fill(outside, float("nan"))
        grad = probs * weight.unsqueeze(-1)
        if smoothing > 0:
            grad.sub_(weight.unsqueeze(-1) * (smoothing / ctx.vocab_size))
        target_weight = -(1.0 - smoothing) * weight * in_shard
        grad.scatter_add_(-1, local_target.unsqueeze(-1), target_weight.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def _check_inputs(vocab_parallel_logits, target, label_smoothing, ignore_index, tp_size: int) -> None:
    if not isinstance(vocab_parallel_logits, torch.Tensor) or not vocab_parallel_logits.is_floating_point():
        raise LossInputError(
            "parallel_cross_entropy needs floating-point logits of shape [..., vocab / tp]; "
            f"got {type(vocab_parallel_logits).__name__} {getattr(vocab_parallel_logits, 'dtype', '')}."
        )
    if vocab_parallel_logits.dim() < 1 or vocab_parallel_logits.shape[-1] == 0:
        raise InputShapeError(
            f"parallel_cross_entropy needs logits with a non-empty last (vocabulary) dimension, "
            f"got shape {tuple(vocab_parallel_logits.shape)}."
        )
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise LossInputError(
            "parallel_cross_entropy takes integer class ids as target (probabilities are not supported); "
            f"got {type(target).__name__} {getattr(target, 'dtype', '')}. Pass a torch.long tensor."
        )
    if tuple(target.shape) != tuple(vocab_parallel_logits.shape[:-1]):
        raise InputShapeError(
            f"target shape {tuple(target.shape)} does not match the logits' leading dimensions "
            f"{tuple(vocab_parallel_logits.shape[:-1])} (logits {tuple(vocab_parallel_logits.shape)}); "
            "give one target id per logits row."
        )
    if target.device != vocab_parallel_logits.device:
        raise LossInputError(
            f"target is on {target.device} but the logits are on {vocab_parallel_logits.device}; move both to one device."
        )
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise LossInputError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}.")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise LossInputError(f"ignore_index must be an int, got {ignore_index!r}.")
    if target.device.type != "cpu":
        return  # reading the check's result would wait for the device on every call
    vocab_size = vocab_parallel_logits.shape[-1] * tp_size
    outside = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    if outside.any():
        first = target[outside][0].item()
        raise LossInputError(
            f"target id {first} is outside the vocabulary [0, {vocab_size}) (the shard size "
            f"{vocab_parallel_logits.shape[-1]} times the tensor-parallel size) and is not ignore_index={ignore_index}; "
            "fix the labels, or mark positions to skip with ignore_index."
        )


def parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0, ignore_index=-100, process_group=None):
    """Per-token cross entropy of vocabulary-sharded logits: `F.cross_entropy(reduction="none")` of the full logits.

    `vocab_parallel_logits` is this rank's contiguous shard `[..., V / tp]` of the
    logits (as `ColumnParallelLinear(gather_output=False)` returns them); `target`
    holds global vocabulary ids of shape `[...]`, the same on every rank of the
    group. Returns the loss of each token, shape `[...]`, in the logits' dtype
    (computed in float32 for 16-bit logits). `label_smoothing` has
    `torch.nn.functional.cross_entropy`'s meaning, and tokens whose target is
    `ignore_index` (default -100, Hugging Face's label convention) get loss 0 and
    gradient 0. `process_group` defaults to the tensor-parallel group.

    Differences from upstream NxD, on purpose: the logits are not modified in
    place (upstream subtracts the maximum from the caller's tensor); a copy of the
    shard in the compute dtype is made and kept, as the softmax, for backward.
    Upstream smooths with the NeMo form (eps * K / (K - 1), K the shard's size);
    here smoothing matches PyTorch for the full vocabulary. Upstream has no
    `ignore_index`. Bad input raises a typed error before any collective, on every
    rank. Target ids outside the vocabulary (and not `ignore_index`) raise
    LossInputError for CPU tensors; on an accelerator they are not checked on the
    host, which would wait for the device on every call: their tokens' loss and
    logits gradient are NaN instead (F.cross_entropy fails there with a device-side
    assert, which ends the process's CUDA context).
    """
    group = parallel_state.get_tensor_model_parallel_group() if process_group is None else process_group
    _check_inputs(vocab_parallel_logits, target, label_smoothing, ignore_index, dist.get_world_size(group))
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, float(label_smoothing), ignore_index, group)

"""ZeRO-1: the optimizer state of a data-parallel model partitioned across its replicas.

Every parameter is flattened, padded to a multiple of the sharding-group size and cut
into equal chunks; rank r of the group owns chunk r of every parameter. The wrapped
optimizer only ever sees the owned chunks (as "master" tensors in `optimizer_dtype`),
so its state takes about 1/DP of what a replicated optimizer holds. A step
reduce-scatters the gradients into those chunks, clips by the global norm, steps the
chunks, and all-gathers the updated chunks back into the parameters. The collectives
of a step run on buckets that pack many parameters' chunks side by side, so a step
issues a few collectives, not one per parameter.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import comm
from ..errors import NeuronxDistributedError, OptimizerConfigError, OptimizerStateError
from ..parallel_layers import parallel_state
from ..parallel_layers.grads import buckets
from ..parallel_layers.resharding import partition_parts, replica_pieces
from ..parallel_layers.utils import is_tensor_parallel

DEFAULT_BUCKET_CAP_MB = 25
_STATE_FORMAT = "neuronx_distributed.zero1/1"


@dataclass
class _Shard:
    """One parameter and the chunk of it that this rank owns (`master`, `chunk` elements, zero-padded)."""

    param: torch.Tensor
    master: torch.nn.Parameter
    chunk: int
    start: int  # where this rank's chunk begins in the flattened parameter
    aliases_param: bool  # the master is a view of the parameter's own memory (same dtype, no padding)
    # Per element of the chunk, 1/copies where the TP group holds several copies of a row (replicated KV
    # heads, resharding.Part), so the norm counts each row once; None where every row is held once.
    norm_weights: torch.Tensor | None = None

    @property
    def owned(self) -> int:
        """How many of the chunk's elements are the parameter's own (the rest is padding)."""
        return max(0, min(self.chunk, self.param.numel() - self.start))


class NeuronZero1Optimizer(torch.optim.Optimizer):
    """Wrap `optimizer_class` so that each data-parallel rank keeps and steps 1/DP of its state.

    Call it like upstream NxD's: `NeuronZero1Optimizer(model.parameters(), torch.optim.AdamW,
    lr=1e-3, ...)`, after `parallel_state.initialize_model_parallel`. Every rank of the job
    constructs it with the same arguments and parameters of the same shapes.

    Arguments:
        params: parameters or parameter-group dicts, as for any torch optimizer.
        optimizer_class: a `torch.optim.Optimizer` subclass, built with `**defaults` over
            this rank's chunks. Element-wise optimizers (SGD, Adam, AdamW) step exactly as
            on the whole model; ones that use per-tensor norms (LAMB) see chunks instead.
        optimizer_dtype: dtype of the chunks and the wrapped optimizer's state (default
            float32). For bfloat16 parameters this keeps fp32 master weights: updates too
            small for bfloat16 accumulate in the masters. Where a parameter already has this
            dtype and its size divides by the group size, its chunk is a view of the
            parameter (no copy); otherwise the chunk is a padded copy.
        grad_clipping, max_norm: clip the gradients by their global 2-norm to `max_norm`
            (None means 1.0, as upstream). The norm is the unsharded model's: chunks are
            summed over the sharding group, parameters marked `tensor_model_parallel`
            count on every TP rank and replicated ones once. `grad_norm` returns it.
        sharding_groups: rank lists, which must be the DP groups
            (`parallel_state.get_data_parallel_group(as_list=True)`, the default);
            partitioning over any other grouping would not average over the replicas.
        grad_norm_groups: rank lists over which the norm is summed beyond the sharding
            group; must be the TP groups (the default).
        pin_layout: Neuron-only (pins XLA collective layouts); accepted and ignored.
        lazy_init: when True, partition only when `init_zero()` is called.
        bucket_cap_mb_reduce_scatter, bucket_cap_mb_all_gather: the size of the buckets
            the collectives run on; 0 (upstream's default, meaning one collective per
            parameter there) means 25 MB here, since bucketing is always on.
        higher_cc_precision: reduce-scatter the gradients in `optimizer_dtype` rather than
            in the parameters' dtype.
        use_grad_acc_hook, save_master_weights, coalesce_cc: Neuron-only; accepted. Master
            weights are always part of `state_dict()` (resuming without them loses the
            precision they carry), and gradients accumulate in `param.grad` as usual.

    Unlike upstream, bad arguments raise `OptimizerConfigError` (no asserts) on every rank:
    the ranks compare their arguments in one small collective before any rank goes on.
    Parameters whose gradient is None on every rank of the sharding group are skipped by
    the step (their state is untouched); one that has a gradient on some ranks only is
    averaged with zeros from the others, as DDP does.

    `step()` consumes the gradients: where the sharding group runs on gloo (whose
    reduce-scatter is an all-reduce), a parameter's gradient is reduced in place, so
    afterwards `param.grad` holds its sum over the group (this rank's chunk averaged and
    clipped); call `zero_grad()` before the next backward, as usual.
    """

    def __init__(
        self,
        params: Iterable,
        optimizer_class: type[torch.optim.Optimizer],
        optimizer_dtype: torch.dtype | None = None,
        grad_clipping: bool = True,
        max_norm: float | None = 1.0,
        pin_layout: bool = True,
        sharding_groups: list[list[int]] | None = None,
        grad_norm_groups: list[list[int]] | None = None,
        lazy_init: bool = False,
        bucket_cap_mb_all_gather: float = 0,
        bucket_cap_mb_reduce_scatter: float = 0,
        use_grad_acc_hook: bool = False,
        save_master_weights: bool = False,
        higher_cc_precision: bool = False,
        coalesce_cc: bool = False,
        **defaults,
    ):
        self._world_group = parallel_state.get_world_group()  # raises unless model parallelism is initialized
        error = None
        try:
            _check_optimizer_class(optimizer_class)
            self.optimizer_dtype = _checked_dtype(optimizer_dtype)
            self.max_norm = _checked_max_norm(max_norm)
            self.grad_clipping = _checked_flag("grad_clipping", grad_clipping)
            self.higher_cc_precision = _checked_flag("higher_cc_precision", higher_cc_precision)
            lazy_init = _checked_flag("lazy_init", lazy_init)
            self._reduce_scatter_bytes = _checked_bucket_bytes("bucket_cap_mb_reduce_scatter", bucket_cap_mb_reduce_scatter)
            self._all_gather_bytes = _checked_bucket_bytes("bucket_cap_mb_all_gather", bucket_cap_mb_all_gather)
            self._sharding_group = _resolve_groups(
                "sharding_groups", sharding_groups, parallel_state.get_data_parallel_group(as_list=True),
                parallel_state.get_data_parallel_group(), "parallel_state.get_data_parallel_group(as_list=True)",
            )
            self._grad_norm_group = _resolve_groups(
                "grad_norm_groups", grad_norm_groups, parallel_state.get_tensor_model_parallel_group(as_list=True),
                parallel_state.get_tensor_model_parallel_group(),
                "parallel_state.get_tensor_model_parallel_group(as_list=True)",
            )
            try:
                super().__init__(params, defaults)
            except (TypeError, ValueError) as torch_error:
                raise OptimizerConfigError(f"params: {torch_error}") from torch_error
        except NeuronxDistributedError as local_error:
            error = local_error
        # What the ranks compare: the arguments with their defaults filled in (None and its meaning agree).
        settings = (
            getattr(optimizer_class, "__qualname__", repr(optimizer_class)),
            getattr(self, "optimizer_dtype", optimizer_dtype), getattr(self, "max_norm", max_norm), grad_clipping,
            parallel_state.get_data_parallel_group(as_list=True) if sharding_groups is None else sharding_groups,
            parallel_state.get_tensor_model_parallel_group(as_list=True) if grad_norm_groups is None else grad_norm_groups,
            lazy_init, higher_cc_precision, sorted(defaults.items(), key=str),
        )
        _agree(self._world_group, error, repr(settings), "the NeuronZero1Optimizer arguments")
        self.optimizer_class = optimizer_class
        self.pin_layout = pin_layout
        self.use_grad_acc_hook = use_grad_acc_hook
        self.save_master_weights = save_master_weights
        self.coalesce_cc = coalesce_cc
        self._inner_defaults = defaults
        self._grad_norm: torch.Tensor | None = None
        self._shards: list[list[_Shard]] = []
        self.base_optimizer: torch.optim.Optimizer | None = None
        if not lazy_init:
            self.init_zero()

    # ----- construction

    @property
    def inited(self) -> bool:
        """Whether the parameters are partitioned (False only between `lazy_init=True` and `init_zero()`)."""
        return self.base_optimizer is not None

    @property
    def sharding_groups(self) -> list[list[int]]:
        """The sharding groups as rank lists (the DP groups)."""
        return parallel_state.get_data_parallel_group(as_list=True)

    def init_zero(self) -> None:
        """Partition the parameters and build the wrapped optimizer over this rank's chunks."""
        if self.inited:
            raise OptimizerConfigError("init_zero() was already called (or lazy_init was False); call it once.")
        error, inner, shards = None, None, []
        try:
            shards = [self._shard_group(group) for group in self.param_groups]
            inner = self.optimizer_class(
                [{**_hyperparameters(group), "params": [s.master for s in group_shards]}
                 for group, group_shards in zip(self.param_groups, shards)],
                **self._inner_defaults,
            )
        except (TypeError, ValueError) as inner_error:
            if isinstance(inner_error, NeuronxDistributedError):
                error = inner_error
            else:
                error = OptimizerConfigError(f"{self.optimizer_class.__name__}(**defaults) refused its arguments: {inner_error}")
        _agree(self._sharding_group, error, self._layout_fingerprint(self.param_groups), "the parameters' shapes and dtypes")
        self._shards, self.base_optimizer = shards, inner
        # Hyperparameters the caller left to the wrapped optimizer's defaults (e.g. lr) become
        # visible here, so that learning-rate schedulers over this wrapper find them.
        for group, inner_group in zip(self.param_groups, inner.param_groups):
            for key, value in _hyperparameters(inner_group).items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (every rank with the same shapes); partitioned at once after `init_zero`."""
        if getattr(self, "base_optimizer", None) is None:
            super().add_param_group(param_group)
            return
        error, shards = None, []
        try:
            probe = {**param_group}
            params = probe["params"]
            probe["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            seen = {id(p) for group in self.param_groups for p in group["params"]}
            if any(id(p) in seen for p in probe["params"]):
                raise OptimizerConfigError("add_param_group: some parameters already belong to another group.")
            shards = self._shard_group(probe)
        except (KeyError, TypeError) as bad:
            error = OptimizerConfigError(f"add_param_group needs a dict with a 'params' list of tensors ({bad!r}).")
        except NeuronxDistributedError as bad:
            error = bad
        _agree(self._sharding_group, error, self._layout_fingerprint([probe] if error is None else []), "the new group")
        super().add_param_group(probe)
        self._shards.append(shards)
        self.base_optimizer.add_param_group({**_hyperparameters(self.param_groups[-1]), "params": [s.master for s in shards]})

    def _shard_group(self, group: dict) -> list[_Shard]:
        size, rank = dist.get_world_size(self._sharding_group), dist.get_rank(self._sharding_group)
        shards = []
        for param in group["params"]:
            if not isinstance(param, torch.Tensor) or not param.is_floating_point():
                raise OptimizerConfigError(f"parameters must be floating-point tensors, got {type(param).__name__}.")
            chunk, start = math.ceil(param.numel() / size), rank * math.ceil(param.numel() / size)
            # Where the chunk needs neither a cast nor padding, the parameter itself is the master:
            # the wrapped optimizer updates it in place and no copy of it is kept.
            aliases = param.dtype == self.optimizer_dtype and param.is_contiguous() and param.numel() % size == 0
            if aliases:
                master = param.detach().view(-1)[start : start + chunk]
            else:
                master = torch.zeros(chunk, dtype=self.optimizer_dtype, device=param.device)
            shard = _Shard(param, torch.nn.Parameter(master, requires_grad=param.requires_grad), chunk, start, aliases,
                           _norm_weights(param, start, chunk))
            if not aliases:
                shard.master.data[: shard.owned] = _owned_slice(shard).to(self.optimizer_dtype)
            shards.append(shard)
        return shards

    @staticmethod
    def _layout_fingerprint(groups: list[dict]) -> str:
        return repr([[(tuple(p.shape), p.dtype, is_tensor_parallel(p)) for p in group["params"]] for group in groups])

    # ----- the step

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The global gradient 2-norm of the last step (before clipping); None before it or without clipping."""
        return self._grad_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients (and the chunks' reduced gradients)."""
        super().zero_grad(set_to_none=set_to_none)
        for shard in self._all_shards():
            shard.master.grad = None

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Reduce-scatter the gradients, clip by the global norm, step this rank's chunks, all-gather the parameters."""
        if not self.inited:
            raise OptimizerConfigError("this optimizer was built with lazy_init=True; call init_zero() before step().")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._push_hyperparameters()
        shards = self._all_shards()
        for shard in shards:
            _adopt_parameter_changes(shard)
        stepped = self._shards_with_gradients(shards)
        self._reduce_scatter_gradients(stepped)  # each chunk's gradient summed (not yet averaged) over the group
        size = dist.get_world_size(self._sharding_group)
        scale: float | torch.Tensor = 1.0 / size
        if self.grad_clipping:
            self._grad_norm = self._global_grad_norm(stepped) / size  # the norm of the average
            scale = (self.max_norm / (self._grad_norm + 1e-6)).clamp(max=1.0) / size
        for shard in stepped:  # the average and the clipping in one pass
            grad = shard.master.grad
            grad.mul_(scale.to(grad.dtype) if isinstance(scale, torch.Tensor) else scale)
        self.base_optimizer.step()
        self._all_gather_parameters(stepped)
        for shard in stepped:
            shard.master.grad = None  # the reduced chunks are spent: do not hold them until zero_grad
        return loss

    def _all_shards(self) -> list[_Shard]:
        return [shard for shards in self._shards for shard in shards]

    def _shards_with_gradients(self, shards: list[_Shard]) -> list[_Shard]:
        """The shards whose parameter has a gradient on some rank of the group (the same list on every rank)."""
        for shard in shards:
            shard.master.grad = None
        if not shards:
            return []
        present = torch.tensor([s.param.grad is not None for s in shards], dtype=torch.float32, device=shards[0].param.device)
        comm.all_reduce(present, op="max", group=self._sharding_group)
        return [shard for shard, anywhere in zip(shards, present.tolist()) if anywhere]

    def _reduce_scatter_gradients(self, shards: list[_Shard]) -> None:
        """Set each shard's `master.grad` to its chunk of the gradient summed over the sharding group."""
        rank = dist.get_rank(self._sharding_group)
        for bucket in _buckets(shards, self._reduce_scatter_bytes, self._grad_dtype):
            # Row r of the bucket holds chunk r of every gradient, side by side: reduce-scatter
            # along the rows leaves each rank with its own chunks of all of them.
            rows, packed = self._gradient_rows(bucket)
            if self._on_gloo(rows):
                # gloo's reduce-scatter is an all-reduce (comm.engine): run it in place, on the
                # packed copy or on the gradient itself, rather than on one more copy.
                comm.all_reduce(rows, op="sum", group=self._sharding_group)
                mine = rows[rank].clone() if packed else rows[rank]
            else:
                mine = comm.reduce_scatter(rows, dim=0, group=self._sharding_group).reshape(-1)
            mine = mine.to(self.optimizer_dtype)
            for shard, grad in zip(bucket, mine.split([s.chunk for s in bucket])):
                shard.master.grad = grad

    def _gradient_rows(self, bucket: list[_Shard]) -> tuple[torch.Tensor, bool]:
        """The bucket's gradients as (group size, chunks side by side), and whether that is a packed copy.

        A lone gradient of the collective's dtype that needs no padding is viewed as is.
        """
        size, dtype = dist.get_world_size(self._sharding_group), self._grad_dtype(bucket[0])
        grad = bucket[0].param.grad
        if (len(bucket) == 1 and grad is not None and grad.dtype == dtype and grad.is_contiguous()
                and grad.numel() == size * bucket[0].chunk):
            return grad.detach().view(size, bucket[0].chunk), False
        rows = torch.empty(size, sum(s.chunk for s in bucket), dtype=dtype, device=bucket[0].param.device)
        for shard, columns in zip(bucket, rows.split([s.chunk for s in bucket], dim=1)):
            _write_padded_rows(columns, shard.param.grad)
        return rows, True

    def _on_gloo(self, tensor: torch.Tensor) -> bool:
        """Whether comm runs collectives on `tensor` over the sharding group through gloo."""
        return (tensor.device.type == "cpu" and dist.get_backend(self._sharding_group) == "gloo"
                and comm.engine_for(self._sharding_group, tensor).name == "torch")

    def _grad_dtype(self, shard: _Shard) -> torch.dtype:
        return self.optimizer_dtype if self.higher_cc_precision else shard.param.dtype

    def _global_grad_norm(self, shards: list[_Shard]) -> torch.Tensor:
        """The 2-norm of the whole unsharded model's gradient as the chunks hold it, the same on every rank."""
        counts_replicated = dist.get_rank(self._grad_norm_group) == 0
        device = shards[0].master.device if shards else self._first_device()
        total = torch.zeros(1, dtype=torch.float32, device=device)
        for shard in shards:
            if not (is_tensor_parallel(shard.param) or counts_replicated):
                continue
            grad = shard.master.grad.detach()
            if shard.norm_weights is None:
                total += torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            else:
                total += (grad.float().square() * shard.norm_weights).sum()
        comm.all_reduce(total, op="sum", group=self._sharding_group)
        comm.all_reduce(total, op="sum", group=self._grad_norm_group)
        return total[0].sqrt()

    def _first_device(self) -> torch.device:
        params = [p for group in self.param_groups for p in group["params"]]
        return params[0].device if params else torch.device("cpu")

    def _all_gather_parameters(self, shards: list[_Shard]) -> None:
        in_flight = []  # gloo buckets: (bucket, gathered rows or None where they are the parameter, works)
        for bucket in _buckets(shards, self._all_gather_bytes, lambda s: s.param.dtype):
            lone = len(bucket) == 1 and bucket[0].aliases_param
            first = bucket[0].param
            if self._on_gloo(first):
                # gloo's all-gather is a broadcast from each rank (comm.engine): broadcast each row
                # in place, straight into a lone aliasing parameter (whose row for this rank is its
                # master) or into rows packed here, every bucket's started before waiting for any,
                # so that gloo's threads overlap them (4 ranks on 2 cores, 2026-12: 340 -> 260 ms
                # for 296 MB of parameters at DP=4, unchanged at DP=2).
                rows = first.detach().view(-1, bucket[0].chunk) if lone else self._packed_rows(bucket)
                in_flight.append((bucket, None if lone else rows, _start_broadcasts(rows, self._sharding_group)))
            elif lone:
                rows = first.detach().view(-1, bucket[0].chunk)
                rows.copy_(comm.all_gather(bucket[0].master.detach().unsqueeze(0), dim=0, group=self._sharding_group))
            else:
                mine = torch.cat([s.master.detach().to(s.param.dtype) for s in bucket]).unsqueeze(0)
                _write_back(bucket, comm.all_gather(mine, dim=0, group=self._sharding_group))
        for bucket, rows, works in in_flight:  # in the order started
            for work in works:
                work.wait()
            if rows is not None:
                _write_back(bucket, rows)

    def _packed_rows(self, bucket: list[_Shard]) -> torch.Tensor:
        """(group size, chunks of the bucket side by side), this rank's row holding the bucket's masters."""
        size, rank = dist.get_world_size(self._sharding_group), dist.get_rank(self._sharding_group)
        rows = torch.empty(size, sum(s.chunk for s in bucket), dtype=bucket[0].param.dtype, device=bucket[0].param.device)
        for shard, mine in zip(bucket, rows[rank].split([s.chunk for s in bucket])):
            mine.copy_(shard.master.detach())
        return rows

    # ----- state

    def state_dict(self) -> dict:
        """This rank's partition: the wrapped optimizer's state, its master chunks and the layout they fit.

        Plain tensors and containers only (loadable with `torch.load(weights_only=True)`).
        """
        if not self.inited:
            raise OptimizerConfigError("this optimizer was built with lazy_init=True; call init_zero() first.")
        self._push_hyperparameters()  # a scheduler may have changed the wrapper's groups since the last step
        inner = self.base_optimizer.state_dict()
        return {
            "format": _STATE_FORMAT,
            "state": inner["state"],
            "param_groups": inner["param_groups"],
            "master_weights": [s.master.detach().clone() for s in self._all_shards()],
            "sharding": self._sharding_layout(),
        }

    def _push_hyperparameters(self) -> None:
        """Give the wrapped optimizer's groups the wrapper's values (learning-rate schedulers change those)."""
        for group, inner_group in zip(self.param_groups, self.base_optimizer.param_groups):
            inner_group.update(_hyperparameters(group))

    def _sharding_layout(self) -> dict:
        return {
            "rank": dist.get_rank(self._sharding_group),
            "size": dist.get_world_size(self._sharding_group),
            "chunks": [[s.chunk for s in shards] for shards in self._shards],
            "optimizer_dtype": str(self.optimizer_dtype),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a `state_dict()` of this rank's partition; nothing changes unless all of it fits."""
        if not self.inited:
            raise OptimizerConfigError("this optimizer was built with lazy_init=True; call init_zero() first.")
        if not isinstance(state_dict, dict) or state_dict.get("format") != _STATE_FORMAT:
            raise OptimizerStateError(
                "not a NeuronZero1Optimizer state dict (no 'format' entry of "
                f"{_STATE_FORMAT!r}); pass what NeuronZero1Optimizer.state_dict() returned."
            )
        expected = self._sharding_layout()
        if state_dict.get("sharding") != expected:
            raise OptimizerStateError(
                f"this state dict holds the partition {state_dict.get('sharding')!r}, but this rank's is {expected!r}; "
                "load the state dict saved by the same rank with the same model, data-parallel size and optimizer_dtype."
            )
        shards = self._all_shards()
        masters = state_dict.get("master_weights")
        if not isinstance(masters, list) or len(masters) != len(shards) or any(
            not isinstance(m, torch.Tensor) or m.shape != s.master.shape for m, s in zip(masters, shards)
        ):
            raise OptimizerStateError("the state dict's master_weights do not match this rank's chunks; it is damaged.")
        state = state_dict.get("state")
        if not isinstance(state, dict) or any(
            not isinstance(index, int) or not 0 <= index < len(shards) or not isinstance(values, dict)
            or any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != shards[index].master.shape
                   for v in values.values())
            for index, values in state.items()
        ):
            raise OptimizerStateError("the state dict's optimizer state does not match this rank's chunks; it is damaged.")
        try:
            self.base_optimizer.load_state_dict({"state": state, "param_groups": state_dict.get("param_groups")})
        except (KeyError, TypeError, ValueError) as torch_error:
            raise OptimizerStateError(f"the wrapped optimizer refused the state dict: {torch_error}") from torch_error
        for shard, master in zip(shards, masters):
            if not shard.aliases_param:  # an aliasing master is the parameter, which the model's own load sets
                shard.master.data.copy_(master)
        for group, inner_group in zip(self.param_groups, self.base_optimizer.param_groups):
            group.update(_hyperparameters(inner_group))

    def save_sharded_state_dict(self, output_dir: str, num_workers_per_step: int = 8) -> None:
        """Save every rank's partition as one sharded checkpoint at `output_dir` (`optimizer.checkpoint`).

        Collective over all ranks. Unlike upstream (a pickled file per rank, loadable only at
        the same DP size), the checkpoint is safetensors plus a JSON manifest of the global
        layout, written atomically, and `load_sharded_state_dict` reads it at any DP size
        (and `checkpoint.load_optimizer_state` into a plain optimizer). The ranks of a host
        write `num_workers_per_step` at a time, as upstream.
        """
        from .checkpoint import save_optimizer_state

        save_optimizer_state(self, output_dir, num_workers_per_step)

    def load_sharded_state_dict(self, output_dir: str, num_workers_per_step: int = 8) -> None:
        """Load a checkpoint of `save_sharded_state_dict` (or of a plain optimizer), saved at any DP size.

        Collective over all ranks; the TP degree must be the saved one. Checksums are checked
        before use; on any error every rank raises a typed error and nothing changes.
        (`output_dir` is upstream's name for the folder to read.)
        """
        from .checkpoint import load_optimizer_state

        load_optimizer_state(self, output_dir, num_workers_per_step)


def _norm_weights(param: torch.Tensor, start: int, chunk: int) -> torch.Tensor | None:
    """The `norm_weights` of the chunk of `param` that starts at flat index `start`."""
    parts = partition_parts(param)
    if parts is None or not is_tensor_parallel(param):
        return None
    dim = getattr(param, "partition_dim", 0)
    weights = torch.cat(
        [torch.full_like(piece, 1.0 / copies, dtype=torch.float32)
         for piece, copies in replica_pieces(param.detach(), parts, param.num_partitions, dim)],
        dim=dim,
    ).reshape(-1)
    mine = weights[start : start + chunk]
    return torch.nn.functional.pad(mine, (0, chunk - mine.numel()))  # the chunk's padding counts nothing


def _hyperparameters(group: dict) -> dict:
    return {key: value for key, value in group.items() if key != "params"}


def _owned_slice(shard: _Shard) -> torch.Tensor:
    """This rank's chunk of the parameter as it is now, without the padding."""
    return shard.param.detach().reshape(-1)[shard.start : shard.start + shard.owned]


def _adopt_parameter_changes(shard: _Shard) -> None:
    """Take into the master chunk every element that the parameter changed outside `step()`.

    An element is taken when the master, rounded to the parameter's dtype, no longer equals
    the parameter (e.g. after loading a model checkpoint); otherwise the master keeps its
    extra precision. A master that aliases its parameter is always current.
    """
    if shard.aliases_param:
        return
    current = _owned_slice(shard)
    master = shard.master.data[: shard.owned]
    if master.dtype == current.dtype:
        master.copy_(current)
    else:
        master.copy_(torch.where(master.to(current.dtype) == current, master, current.to(master.dtype)))


def _write_padded_rows(columns: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Write the gradient (zeros when this rank has none), flattened and zero-padded, into (size, chunk) `columns`."""
    if grad is None:
        columns.zero_()
    elif grad.numel() == columns.numel():
        columns.copy_(grad.detach().reshape(columns.shape))
    else:
        padded = torch.zeros(columns.numel(), dtype=columns.dtype, device=columns.device)
        padded[: grad.numel()] = grad.detach().reshape(-1)
        columns.copy_(padded.view(columns.shape))


def _write_back(bucket: list[_Shard], rows: torch.Tensor) -> None:
    """Copy the gathered (group size, chunks of the bucket) `rows` into the bucket's parameters."""
    for shard, columns in zip(bucket, rows.split([s.chunk for s in bucket], dim=1)):
        target = shard.param.detach()
        if target.is_contiguous() and columns.numel() == target.numel():
            target.view(columns.shape).copy_(columns)
        else:
            target.copy_(columns.reshape(-1)[: target.numel()].view_as(target))


def _start_broadcasts(rows: torch.Tensor, group: dist.ProcessGroup) -> list:
    """Start a broadcast of row r of `rows` from group rank r, for every r; returns the work handles.

    Through torch.distributed itself, since comm has no asynchronous calls: only where comm
    would run them on its torch engine anyway (gloo).
    """
    return [dist.broadcast(row, src=src, group=group, async_op=True)
            for row, src in zip(rows, dist.get_process_group_ranks(group))]


def _buckets(shards: list[_Shard], cap_bytes: int, dtype_of) -> list[list[_Shard]]:
    """Shards grouped by (collective dtype, device), each bucket at most `cap_bytes` of whole parameters."""
    return buckets(
        shards, cap_bytes, lambda shard: (dtype_of(shard), shard.param.device),
        lambda shard: shard.param.numel() * dtype_of(shard).itemsize,
    )


def _agree(group: dist.ProcessGroup, error: NeuronxDistributedError | None, description: str, what: str) -> None:
    """Raise on every rank of `group` if any rank has an error or a different `description`.

    One all-reduce (max) of [error flag per rank, crc, -crc] lets every rank see whether a
    peer failed or disagrees, so that none goes on to a collective the others never join.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    crc = float(zlib.crc32(description.encode()))
    vote = torch.zeros(size + 2, dtype=torch.float64, device=_collective_device(group))
    vote[rank] = 1.0 if error is not None else 0.0
    vote[size], vote[size + 1] = crc, -crc
    if size > 1:
        comm.all_reduce(vote, op="max", group=group)
    if error is not None:
        raise error
    failed = [r for r in range(size) if vote[r] > 0]
    if failed:
        raise OptimizerConfigError(
            f"ranks {failed} of this group (group ranks) refused their optimizer arguments; see the error on those ranks."
        )
    if vote[size] != -vote[size + 1]:
        raise OptimizerConfigError(
            f"the ranks passed different {what}; every rank must build NeuronZero1Optimizer with the same arguments "
            "and parameters of the same shapes, in the same order."
        )


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where a small tensor for a collective over `group` must live: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_optimizer_class(optimizer_class) -> None:
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise OptimizerConfigError(
            f"optimizer_class must be a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW), got {optimizer_class!r}; "
            "pass the class itself, not an instance."
        )


def _checked_dtype(optimizer_dtype) -> torch.dtype:
    if optimizer_dtype is None:
        return torch.float32
    if not isinstance(optimizer_dtype, torch.dtype) or not optimizer_dtype.is_floating_point:
        raise OptimizerConfigError(f"optimizer_dtype must be a floating torch.dtype (e.g. torch.float32), got {optimizer_dtype!r}.")
    return optimizer_dtype


def _checked_max_norm(max_norm) -> float:
    if max_norm is None:
        return 1.0
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not math.isfinite(max_norm) or max_norm <= 0:
        raise OptimizerConfigError(f"max_norm must be a finite number above 0 (or None for 1.0), got {max_norm!r}.")
    return float(max_norm)


def _checked_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise OptimizerConfigError(f"{name} must be True or False, got {value!r}.")
    return value


def _checked_bucket_bytes(name: str, cap_mb) -> int:
    if isinstance(cap_mb, bool) or not isinstance(cap_mb, (int, float)) or not math.isfinite(cap_mb) or cap_mb < 0:
        raise OptimizerConfigError(f"{name} must be a number of megabytes >= 0 (0: {DEFAULT_BUCKET_CAP_MB} MB), got {cap_mb!r}.")
    return int((cap_mb or DEFAULT_BUCKET_CAP_MB) * 1024 * 1024)


def _resolve_groups(name: str, rank_lists, expected: list[list[int]], group: dist.ProcessGroup, how: str):
    """The process group for `rank_lists`, which must be `expected` (None selects it)."""
    if rank_lists is None:
        return group
    try:
        given = sorted(list(ranks) for ranks in rank_lists)
    except TypeError:
        given = None
    if given != sorted(expected):
        raise OptimizerConfigError(
            f"{name} must be {how} = {expected} (or None for that), got {rank_lists!r}; other groupings are not "
            "supported because the chunks must be averaged over exactly the replicas of the same shard."
        )
    return group

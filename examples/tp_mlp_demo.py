"""Train a small transformer language model with tensor x data parallelism, next to its unsharded twin.

    torchrun --standalone --nproc_per_node=2 examples/tp_mlp_demo.py --tensor_parallel_degree 2

Every rank also trains the same model built from torch.nn layers on the whole
global batch; rank 0 prints both losses step by step and the largest gap.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from neuronx_distributed import parallel_state
from neuronx_distributed.parallel_layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    all_reduce_gradients,
    clip_grad_norm,
    move_model_to_device,
)


class AffineSequences(Dataset):
    """Token sequences t[i+1] = (a * t[i] + b) mod vocab from seeded random starts: learnable, offline."""

    def __init__(self, size: int, seq: int, vocab: int):
        starts = torch.randint(0, vocab, (size, 1), generator=torch.Generator().manual_seed(0))
        steps = torch.arange(seq)
        self.tokens = (starts * 5 ** steps + 3 * (5**steps - 1) // 4) % vocab

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]


class Block(nn.Module):
    """Pre-norm transformer block; attention and MLP sharded as the seed shards BERT's."""

    def __init__(self, hidden: int, heads: int, parallel: bool):
        super().__init__()
        tp = parallel_state.get_tensor_model_parallel_size() if parallel else 1
        column = (lambda i, o: ColumnParallelLinear(i, o, gather_output=False)) if parallel else nn.Linear
        row = (lambda i, o: RowParallelLinear(i, o, input_is_parallel=True)) if parallel else nn.Linear
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.query, self.key, self.value = column(hidden, hidden), column(hidden, hidden), column(hidden, hidden)
        self.attention_output = row(hidden, hidden)
        self.fc1, self.fc2 = column(hidden, 4 * hidden), row(4 * hidden, hidden)
        self.heads, self.head_dim = heads // tp, hidden // heads

    def forward(self, x):
        h = self.norm1(x)
        q, k, v = (t(h).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in (self.query, self.key, self.value))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
        x = x + self.attention_output(context)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, heads: int, layers: int, parallel: bool):
        super().__init__()
        self.embed = ParallelEmbedding(vocab, hidden) if parallel else nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, parallel) for _ in range(layers))
        self.head = ColumnParallelLinear(hidden, vocab, gather_output=True) if parallel else nn.Linear(hidden, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def next_token_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensor_parallel_degree", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8, help="per data-parallel replica")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_parallel_degree)
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    dataset = AffineSequences(size=args.steps * args.batch_size * dp_size, seq=33, vocab=args.vocab)
    samplers = [DistributedSampler(dataset, num_replicas=dp_size, rank=r, seed=0) for r in range(dp_size)]
    loaders = [DataLoader(dataset, batch_size=args.batch_size, sampler=s, drop_last=True) for s in samplers]

    torch.manual_seed(0)
    model = move_model_to_device(TinyLM(args.vocab, args.hidden, args.heads, args.layers, parallel=True), "cpu")
    torch.manual_seed(0)
    reference = TinyLM(args.vocab, args.hidden, args.heads, args.layers, parallel=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=3e-3)

    rank0 = dist.get_rank() == 0
    if rank0:
        tp = parallel_state.get_tensor_model_parallel_size()
        own = sum(p.numel() * p.element_size() for p in model.parameters())
        full = sum(p.numel() * p.element_size() for p in reference.parameters())
        print(f"TP={tp} x DP={dp_size}: parameter bytes per rank {own:,} (unsharded {full:,})")
        print(f"{'step':>4}  {'loss TP':>10}  {'loss unsharded':>14}  {'|diff|':>9}")
    worst = 0.0
    for step, batches in enumerate(zip(*loaders)):
        loss = next_token_loss(model, batches[dp_rank])
        loss.backward()
        all_reduce_gradients(model.parameters())  # average over the DP group, then clip the true gradient
        clip_grad_norm(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()

        ref_loss = next_token_loss(reference, torch.cat(batches))
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
        ref_optimizer.step()
        ref_optimizer.zero_grad()

        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, group=parallel_state.get_data_parallel_group())
        global_loss /= dp_size
        worst = max(worst, abs(global_loss.item() - ref_loss.item()))
        if rank0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"{step:>4}  {global_loss.item():>10.6f}  {ref_loss.item():>14.6f}  {abs(global_loss.item() - ref_loss.item()):>9.2e}")
    if rank0:
        print(f"largest |loss difference| over {args.steps} steps: {worst:.2e} (a uniform guess scores ln(vocab) = {math.log(args.vocab):.2f})")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

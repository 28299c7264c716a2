#!/usr/bin/env python3
"""A small decoder-only transformer trained for a few steps with longattn's distributed attention,
against the same model trained with PyTorch's scaled_dot_product_attention in one process.

Launch: torchrun --nproc-per-node 2 examples/torch_train.py (or plain python: one rank). Every rank
holds its shard of the sequence (longattn.torch.Sharding: zigzag rows and their positions), runs
embeddings, MLPs and the loss on its rows only and longattn's attention across ranks; the gradients
of the replicated weights are summed over ranks (as data parallelism would), so each step equals a
one-process step on the whole sequence. Rank 0 also trains an identical copy with SDPA on the whole
sequence and compares the losses step by step; the run fails when they differ by more than
--tolerance (relative). The last line is RESULT {json}.
"""

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import longattn.torch as lt


def parse_flags():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default 5)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens of the training sequence (default 512)")
    parser.add_argument("--vocab", type=int, default=128, help="vocabulary size (default 128)")
    parser.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads, dividing --heads (default 2)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    parser.add_argument("--strategy", default="auto", choices=["auto", "ring", "ulysses", "hybrid"])
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "striped"])
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative loss difference to the SDPA run allowed at any step (default 1e-4)")
    parser.add_argument("--no-reference", action="store_true", help="skip the one-process SDPA run")
    flags = parser.parse_args()
    if flags.heads % flags.kv_heads or flags.dim % flags.heads or min(flags.steps, flags.seq_len, flags.layers) < 1:
        parser.error("--heads must be a multiple of --kv-heads, --dim of --heads, and steps, seq-len, layers >= 1")
    return flags


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attention_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.key_value = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, attend):
        tokens = x.shape[0]
        h = self.attention_norm(x)
        q = self.query(h).view(tokens, self.heads, self.head_dim)
        k, v = self.key_value(h).view(tokens, 2, self.kv_heads, self.head_dim).unbind(1)
        o = attend(q, k.contiguous(), v.contiguous())
        x = x + self.out(o.reshape(tokens, -1))
        return x + self.mlp(self.mlp_norm(x))


class DecoderOnly(nn.Module):
    def __init__(self, flags):
        super().__init__()
        self.embed = nn.Embedding(flags.vocab, flags.dim)
        self.position = nn.Embedding(flags.seq_len, flags.dim)
        self.blocks = nn.ModuleList(Block(flags.dim, flags.heads, flags.kv_heads) for _ in range(flags.layers))
        self.norm = nn.LayerNorm(flags.dim)
        self.head = nn.Linear(flags.dim, flags.vocab, bias=False)

    def forward(self, tokens, positions, attend):
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x, attend)
        return self.head(self.norm(x))


def sdpa_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              is_causal=True).transpose(0, 1)


def training_data(flags):
    """A sequence with structure to learn (each token mostly follows from the one before)."""
    generator = torch.Generator().manual_seed(flags.seed + 1)
    tokens = torch.empty(flags.seq_len + 1, dtype=torch.int64)
    tokens[0] = 0
    noise = torch.randint(0, flags.vocab, (flags.seq_len,), generator=generator)
    keep = torch.rand(flags.seq_len, generator=generator) < 0.8
    for i in range(flags.seq_len):
        tokens[i + 1] = (tokens[i] * 5 + 3) % flags.vocab if keep[i] else noise[i]
    return tokens[:-1], tokens[1:]


def train_longattn(model, flags, inputs, targets, distributed):
    head_dim = flags.dim // flags.heads
    sharding = lt.Sharding(torch.empty(flags.seq_len, flags.heads, head_dim),
                           torch.empty(flags.seq_len, flags.kv_heads, head_dim), causal=True,
                           strategy=flags.strategy, layout=flags.layout)
    local_inputs, local_targets = sharding.shard(inputs), sharding.shard(targets)
    positions = sharding.positions().long()

    def attend(q, k, v):
        return lt.attention(q, k, v, causal=True, strategy=flags.strategy, layout=flags.layout)

    optimizer = torch.optim.AdamW(model.parameters(), lr=flags.lr)
    losses = []
    for _ in range(flags.steps):
        optimizer.zero_grad()
        logits = model(local_inputs, positions, attend)
        # This rank's share of the mean over the whole sequence: the shares add up to the mean.
        loss = F.cross_entropy(logits, local_targets, reduction="sum") / flags.seq_len
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(total)
            for parameter in model.parameters():
                dist.all_reduce(parameter.grad)
        optimizer.step()
        losses.append(float(total))
    return losses, sharding.strategy


def train_sdpa(model, flags, inputs, targets):
    optimizer = torch.optim.AdamW(model.parameters(), lr=flags.lr)
    positions = torch.arange(flags.seq_len)
    losses = []
    for _ in range(flags.steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs, positions, sdpa_causal), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def main():
    flags = parse_flags()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    torch.manual_seed(flags.seed)
    model = DecoderOnly(flags)
    reference_model = copy.deepcopy(model)
    inputs, targets = training_data(flags)

    losses, strategy = train_longattn(model, flags, inputs, targets, distributed)
    is_root = lt.rank() == 0
    reference = train_sdpa(reference_model, flags, inputs, targets) if is_root and not flags.no_reference else []
    worst = max((abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, reference)), default=0.0)
    ok = worst <= flags.tolerance
    if is_root:
        print(f"{'step':>4} {'longattn loss':>14} {'sdpa loss':>14}")
        for step, loss in enumerate(losses):
            print(f"{step:>4} {loss:>14.7f} {reference[step] if reference else float('nan'):>14.7f}")
        print(f"ranks {lt.world_size()}, strategy {strategy}, largest relative difference {worst:.2e} "
              f"(tolerance {flags.tolerance:.0e}): {'equal' if ok else 'DIFFERENT'}")
        result = {"ranks": lt.world_size(), "strategy": strategy, "layout": flags.layout, "seq_len": flags.seq_len,
                  "steps": flags.steps, "losses": losses, "sdpa_losses": reference, "max_relative_difference": worst,
                  "tolerance": flags.tolerance, "ok": ok}
        print("RESULT " + json.dumps(result), flush=True)
    if distributed:
        # Every rank leaves together: rank 0 still runs the reference while the others are done,
        # and a process group torn down while a peer still holds it can abort the process.
        dist.barrier()
        dist.destroy_process_group()
    if not ok:
        print(f"torch_train: the losses differ from the SDPA run by {worst:.2e} (> {flags.tolerance:.0e})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

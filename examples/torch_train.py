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

With --device cuda each rank trains on GPU LOCAL_RANK under bf16 autocast (longattn's GPU backends
take bf16), the gradients are summed over NCCL, and RESULT adds the median step time, tokens/s and
each rank's peak GPU memory; a sequence that does not fit ends with a one-line out-of-memory error
naming the tokens and the ranks, so a context one GPU cannot hold can be shown to run on two
(scripts/gpu-torchrun-run.sh). The SDPA reference holds the whole sequence's T x T scores on one
device: leave it out (--no-reference) at long contexts.
"""

import argparse
import contextlib
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import longattn
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
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative loss difference to the SDPA run allowed at any step (default 1e-4; "
                             "2e-2 with --device cuda, whose bf16 run is compared with an fp32 reference)")
    parser.add_argument("--no-reference", action="store_true", help="skip the one-process SDPA run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu (float32), or cuda: GPU LOCAL_RANK, bf16 autocast, NCCL for the gradients")
    flags = parser.parse_args()
    if flags.heads % flags.kv_heads or flags.dim % flags.heads or min(flags.steps, flags.seq_len, flags.layers) < 1:
        parser.error("--heads must be a multiple of --kv-heads, --dim of --heads, and steps, seq-len, layers >= 1")
    if flags.tolerance is None:
        flags.tolerance = 2e-2 if flags.device == "cuda" else 1e-4
    if flags.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA device (torch.cuda.is_available() is False); "
                     "run with --device cpu here")
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


def train_longattn(model, flags, inputs, targets, distributed, device):
    head_dim = flags.dim // flags.heads
    # The plan is the one the op will run: same device and dtype as q, k, v (only their shapes count,
    # so expanded views stand for the whole sequence without its memory).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    like = lambda heads: torch.empty(1, heads, head_dim, device=device, dtype=dtype).expand(flags.seq_len, -1, -1)
    sharding = lt.Sharding(like(flags.heads), like(flags.kv_heads), causal=True, strategy=flags.strategy,
                           layout=flags.layout)
    local_inputs, local_targets = sharding.shard(inputs).to(device), sharding.shard(targets).to(device)
    positions = sharding.positions().long().to(device)

    def attend(q, k, v):
        return lt.attention(q, k, v, causal=True, strategy=flags.strategy, layout=flags.layout)

    # On GPUs the linear layers run in bf16 (so q, k, v reach longattn in bf16), the rest in fp32.
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    optimizer = torch.optim.AdamW(model.parameters(), lr=flags.lr)
    losses, seconds = [], []
    for _ in range(flags.steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        with precision:
            logits = model(local_inputs, positions, attend)
        # This rank's share of the mean over the whole sequence: the shares add up to the mean.
        loss = F.cross_entropy(logits.float(), local_targets, reduction="sum") / flags.seq_len
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(total)
            for parameter in model.parameters():
                dist.all_reduce(parameter.grad)
        optimizer.step()
        losses.append(float(total))  # waits for the step's GPU work
        seconds.append(time.perf_counter() - started)
    return losses, sharding.strategy, seconds


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


def out_of_memory(flags, error):
    """The one line a sequence too long for the GPUs ends with (and a RESULT saying so)."""
    gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2 ** 30
    print(f"torch_train: {flags.seq_len} tokens do not fit on {lt.world_size()} GPU(s) of {gib:.0f} GiB "
          f"(rank {lt.rank()}: {str(error).splitlines()[0]}); run on more GPUs or shorten --seq-len",
          file=sys.stderr, flush=True)
    print("RESULT " + json.dumps({"ranks": lt.world_size(), "device": "cuda", "seq_len": flags.seq_len, "ok": False,
                                  "error": "out of memory"}), flush=True)
    sys.exit(3)


def peak_gib_per_rank(device, distributed):
    """Every rank's peak GPU memory in GiB (collective under torchrun); None on CPU."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2 ** 30], device=device)
    if distributed:
        import torch.distributed as dist

        gathered = [torch.zeros_like(peak) for _ in range(lt.world_size())]
        dist.all_gather(gathered, peak)
        peak = torch.cat(gathered)
    return [round(float(x), 2) for x in peak]


def main():
    flags = parse_flags()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cpu")
    if flags.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(flags.seed)
    model = DecoderOnly(flags)
    reference_model = None if flags.no_reference else copy.deepcopy(model)
    model.to(device)
    inputs, targets = training_data(flags)

    try:
        losses, strategy, seconds = train_longattn(model, flags, inputs, targets, distributed, device)
    except (torch.cuda.OutOfMemoryError, longattn.LongattnError) as error:
        # PyTorch's allocator or longattn's own (a full GPU is longattn's "out_of_capacity").
        if isinstance(error, longattn.LongattnError) and error.status != "out_of_capacity":
            raise
        out_of_memory(flags, error)
    is_root = lt.rank() == 0
    peaks = peak_gib_per_rank(device, distributed)  # collective: every rank, before rank 0 goes on alone
    reference = train_sdpa(reference_model, flags, inputs, targets) if is_root and not flags.no_reference else []
    worst = max((abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, reference)), default=0.0)
    ok = worst <= flags.tolerance
    if is_root:
        print(f"{'step':>4} {'longattn loss':>14} {'sdpa loss':>14}")
        for step, loss in enumerate(losses):
            print(f"{step:>4} {loss:>14.7f} {reference[step] if reference else float('nan'):>14.7f}")
        print(f"ranks {lt.world_size()}, strategy {strategy}, largest relative difference {worst:.2e} "
              f"(tolerance {flags.tolerance:.0e}): {'equal' if ok else 'DIFFERENT'}")
        result = {"ranks": lt.world_size(), "device": device.type, "strategy": strategy, "layout": flags.layout,
                  "seq_len": flags.seq_len, "steps": flags.steps, "losses": losses, "sdpa_losses": reference,
                  "max_relative_difference": worst, "tolerance": flags.tolerance, "ok": ok}
        # After the first step (which builds plans and kernels): the median step, and its tokens/s.
        timed = sorted(seconds[1:] or seconds)
        result["step_ms"] = 1e3 * timed[len(timed) // 2]
        result["tokens_per_second"] = flags.seq_len / timed[len(timed) // 2]
        if peaks:
            result["peak_gib_per_rank"] = peaks
            print(f"median step {result['step_ms']:.1f} ms ({result['tokens_per_second']:.0f} tokens/s), "
                  f"peak GPU memory per rank {result['peak_gib_per_rank']} GiB")
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

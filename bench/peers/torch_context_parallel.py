#!/usr/bin/env python3
"""Peer for `longattn-bench ring`: PyTorch context parallel (ring attention over SDPA with
load-balanced causal sharding) on the same shapes, in the same job. Launch with
  torchrun --standalone --nproc_per_node=2 bench/peers/torch_context_parallel.py --seqs 131072,524288
Prints a table and ends with RESULT {json} (per-GPU TFLOP/s, wall ms, forward and forward+backward).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # load-balanced (head-tail) causal sharding; the default in recent releases, set explicitly
    from torch.distributed.tensor.experimental._attention import _cp_options
    _cp_options.enable_load_balance = True
except Exception:  # noqa: BLE001 - older/newer layouts of the private module
    _cp_options = None


def timed(fn, iters):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    t = torch.tensor([sorted(times)[len(times) // 2]], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="131072,524288")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--backends", default="cudnn,flash")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    mesh = init_device_mesh("cuda", (world,))
    kinds = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    rows = []
    if rank == 0:
        print(f"{'backend':8} {'seq':>8} {'fwd ms':>9} {'fwd TF/gpu':>11} {'f+b ms':>9} {'f+b TF/gpu':>11}", flush=True)
    for name in args.backends.split(","):
        for seq in (int(s) for s in args.seqs.split(",")):
            h, d = args.heads, args.head_dim
            g = torch.Generator(device="cuda").manual_seed(1234)
            mk = lambda: torch.rand((1, h, seq, d), device="cuda", dtype=torch.bfloat16, generator=g) * 2 - 1  # noqa: E731
            q, k, v, do = mk(), mk(), mk(), mk()
            row = {"backend": name, "seq": seq, "world": world}
            try:
                with sdpa_kernel(kinds[name]), context_parallel(
                        mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers={q, k, v, do}):
                    # Inside the context q, k, v, do are this rank's load-balanced shards.
                    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                    ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))

                    def fwdbwd():
                        out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True)
                        out.backward(do)
                    row["fwd_ms"] = timed(fwd, args.iters)
                    row["fwdbwd_ms"] = timed(fwdbwd, args.iters)
            except Exception as e:  # noqa: BLE001 - report the failure in the table, keep going
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            flops = 4.0 * seq * seq * h * d * 0.5
            if "fwd_ms" in row:
                row["fwd_tflops_per_gpu"] = flops / world / (row["fwd_ms"] * 1e-3) / 1e12
                row["fwdbwd_tflops_per_gpu"] = 3.5 * flops / world / (row["fwdbwd_ms"] * 1e-3) / 1e12
                if rank == 0:
                    print(f"{name:8} {seq:8d} {row['fwd_ms']:9.1f} {row['fwd_tflops_per_gpu']:11.1f} "
                          f"{row['fwdbwd_ms']:9.1f} {row['fwdbwd_tflops_per_gpu']:11.1f}", flush=True)
            elif rank == 0:
                print(f"{name:8} {seq:8d} failed: {row['error']}", flush=True)
            rows.append(row)
            del q, k, v, do
            torch.cuda.empty_cache()
    if rank == 0:
        print("RESULT " + json.dumps({"peer": "torch_context_parallel", "torch": torch.__version__, "heads": args.heads,
                                      "head_dim": args.head_dim, "causal": True, "dtype": "bf16", "rows": rows}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

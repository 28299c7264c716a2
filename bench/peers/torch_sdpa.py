#!/usr/bin/env python3
"""Peer for `longattn-bench gpu-kernels`: PyTorch's scaled_dot_product_attention with its flash and
cuDNN backends on the same shapes (bf16, batch 1, 32 heads; seq 8k/32k/128k; causal and not; head
dims 64/128), timed the same way (CUDA events around ~20 ms of back-to-back calls after a warm-up,
median over repeats of the time per call), plus decode (1 query token,
32 q heads over 8 kv heads, 1M-token KV). Prints one line per shape and a final RESULT {json}."""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def median_ms(fn, reps, batch_ms=20.0):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def per_call(calls):
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / calls

    fn()  # warm-up
    torch.cuda.synchronize()
    calls = min(1000, max(1, int(batch_ms / max(per_call(1), 1e-3))))
    return statistics.median(per_call(calls) for _ in range(reps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="8192,32768,131072")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--causal", default="both")
    ap.add_argument("--decode-kv", type=int, default=1 << 20)
    args = ap.parse_args()
    seqs = [int(x) for x in args.seqs.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    causals = [c for c in (True, False) if args.causal == "both" or int(args.causal) == int(c)]
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    rows = []
    H = args.heads
    for name, be in BACKENDS.items():
        for d in dims:
            for L in seqs:
                for causal in causals:
                    row = {"backend": name, "seq": L, "d": d, "causal": causal}
                    try:
                        q, k, v, g = (torch.empty(1, H, L, d, device=dev, dtype=torch.bfloat16).uniform_(-1, 1) for _ in range(4))
                        for t in (q, k, v):
                            t.requires_grad_(True)
                        reps = min(args.reps, 3) if L >= 131072 else args.reps
                        flops = 4.0 * L * L * d * H * (0.5 if causal else 1.0)
                        with sdpa_kernel([be]):
                            fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), reps)
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            bwd = median_ms(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True), reps)
                        row.update(fwd_ms=fwd, bwd_ms=bwd, fwd_tflops=flops / fwd / 1e9, bwd_tflops=2.5 * flops / bwd / 1e9)
                        del q, k, v, g, out
                    except Exception as e:  # a backend that refuses a shape is reported, not fatal
                        row["error"] = str(e).splitlines()[0][:120]
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(f"torch-{name:5s} seq {L:6d} d {d:3d} {'causal' if causal else 'full':6s} "
                          f"fwd {row.get('fwd_ms', 0):8.2f} ms {row.get('fwd_tflops', 0):6.1f} TFLOP/s | "
                          f"bwd {row.get('bwd_ms', 0):8.2f} ms {row.get('bwd_tflops', 0):6.1f} TFLOP/s {row.get('error', '')}",
                          flush=True)
    decode = []
    T, hq, hkv, d = args.decode_kv, 32, 8, 128
    q = torch.empty(1, hq, 1, d, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
    k, v = (torch.empty(1, hkv, T, d, device=dev, dtype=torch.bfloat16).uniform_(-1, 1) for _ in range(2))
    for name, be in BACKENDS.items():
        row = {"backend": name, "kv_tokens": T}
        try:
            with sdpa_kernel([be]):
                ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 20)
            row.update(ms=ms, gbs=2 * k.numel() * 2 / ms / 1e6)
        except Exception as e:
            row["error"] = str(e).splitlines()[0][:120]
        decode.append(row)
        print(f"decode torch-{name}: {row.get('ms', 0):.3f} ms, {row.get('gbs', 0):.0f} GB/s {row.get('error', '')}", flush=True)
    print("RESULT " + json.dumps({"bench": "torch-sdpa", "device": torch.cuda.get_device_name(), "heads": H,
                                  "attention": rows, "decode": decode}))


if __name__ == "__main__":
    main()

"""(ITERS=N timed repetitions, default 10; TIMING_ONLY=1 skips the checks.)
The PyTorch op on CUDA tensors, one process (one rank): forward and backward against PyTorch's
SDPA in fp32 on the same bf16 inputs (causal and full, GQA, a varlen batch), then the op's time at
32k tokens (32 heads, d128, bf16, causal, forward and forward+backward), medians of CUDA-event
timings, printed for the comparison with `longattn-bench ring` at the same shape. RESULT line last."""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import longattn.torch as lt


def reference(q, k, v, causal, cu):
    outs = []
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[s:e].float().transpose(0, 1) for x in (q, k, v))
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1))
    return torch.cat(outs)


def check(tokens, heads, kv_heads, dim, causal, cu):
    g = torch.Generator(device="cuda").manual_seed(int(time.time()))
    mk = lambda h: torch.randn(tokens, h, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = mk(heads), mk(kv_heads), mk(kv_heads)
    for x in (q, k, v):
        x.requires_grad_(True)
    cu_t = torch.tensor(cu, dtype=torch.int32) if len(cu) > 2 else None
    o = lt.attention(q, k, v, causal=causal, cu_seqlens=cu_t)
    d_o = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), d_o)
    qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = reference(qr, kr, vr, causal, cu)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), d_o.float())
    errs = [((o.float() - ref).abs().max() / ref.abs().max()).item()]
    errs += [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref_grads)]
    ok = all(e < 2e-2 for e in errs)
    print(f"tokens {tokens} heads {heads}/{kv_heads} d{dim} causal {causal} seqs {len(cu) - 1}: "
          f"rel err o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def timed(fn, iters=int(os.environ.get("ITERS", "10"))):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ok = True
    if os.environ.get("TIMING_ONLY") != "1":
        ok &= check(4096, 8, 2, 128, True, [0, 4096])
        ok &= check(3000, 8, 8, 64, False, [0, 3000])
        ok &= check(6000, 8, 2, 128, True, [0, 1, 700, 700, 4000, 6000])
    tokens = 32768
    q, k, v = (torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    d_o = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16)
    fwd = timed(lambda: lt.attention(q, k, v, causal=True))
    both = timed(lambda: torch.autograd.grad(lt.attention(q, k, v, causal=True), (q, k, v), d_o))
    print(f"op at 32k, 32 heads d128 bf16 causal: forward {fwd:.3f} ms, forward+backward {both:.3f} ms")
    print("RESULT " + json.dumps({"ok": ok, "seq": tokens, "op_fwd_ms": fwd, "op_fwd_bwd_ms": both}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

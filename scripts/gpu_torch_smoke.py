"""(ITERS=N timed repetitions, default 10; TIMING_ONLY=1 skips the checks.)
The PyTorch op on CUDA tensors, one process (one rank): forward and backward against PyTorch's
SDPA in fp32 on the same bf16 inputs (causal and full, GQA, a varlen batch), then the op's time at
32k tokens (32 heads, d128, bf16, causal, forward and forward+backward), medians of CUDA-event
timings, printed for the comparison with `longattn-bench ring` at the same shape, and a breakdown
of that time (the C API called straight from ctypes, the custom ops without autograd; PROFILE=1 adds
torch.profiler's tables). RESULT line last."""
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


# DEVICE=cpu: the timing part only, on CPU tensors (TOKENS of them, float32, wall-clock timing), for
# the host-side share of the op's time where no GPU is at hand.
DEVICE = os.environ.get("DEVICE", "cuda")


def timed(fn, iters=int(os.environ.get("ITERS", "10"))):
    for _ in range(3):
        fn()
    if DEVICE == "cpu":
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - started))
        return sorted(times)[len(times) // 2]
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


def breakdown(q, k, v, d_o):
    """Where the op's time goes against the C++ bench: the same C API calls made straight from ctypes
    with descriptors built beforehand (no custom-op dispatch, no allocation, no autograd), then the
    custom ops called without autograd. The op minus `capi` is Python's and PyTorch's share; `capi`
    against `longattn-bench ring` is the C API's. PROFILE=1 adds torch.profiler's table of one
    forward+backward through autograd (GPU kernels and host ops by time)."""
    from longattn._capi import check, lib
    from longattn.torch import _op, _runtime

    scale = 1.0 / 128 ** 0.5
    args = (None, True, scale, "auto", "zigzag", -1, -1)
    qd, kd, vd = (x.detach() for x in (q, k, v))
    o, lse = _op.attention_forward(qd, kd, vd, *args)
    attention = _op.planned_attention(qd, kd, None, True, scale, "auto", "zigzag", -1, -1)
    # Every tensor a descriptor points at stays referenced here: a descriptor holds only the address.
    o_out, lse_out = torch.empty_like(o), torch.empty_like(lse)
    dq, dk, dv = (torch.empty_like(x) for x in (qd, kd, vd))
    d = _runtime.descriptor
    fwd_desc = [d(x) for x in (qd, kd, vd, o_out, lse_out)]
    bwd_desc = [d(x) for x in (qd, kd, vd, o, lse, d_o, dq, dk, dv)]
    stream = _runtime.stream_of(qd)
    parts = {
        "capi_fwd_ms": timed(lambda: check(lib.longattn_attention_forward(attention.handle, *fwd_desc, stream))),
        "capi_bwd_ms": timed(lambda: check(lib.longattn_attention_backward(attention.handle, *bwd_desc, stream))),
        "custom_op_fwd_ms": timed(lambda: _op.attention_forward(qd, kd, vd, *args)),
        "custom_op_bwd_ms": timed(lambda: _op.attention_backward(d_o, qd, kd, vd, o, lse, *args)),
    }
    print("breakdown: " + ", ".join(f"{name} {ms:.3f}" for name, ms in parts.items()))
    if os.environ.get("PROFILE") == "1":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(lt.attention(q, k, v, causal=True), (q, k, v), d_o)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    return parts


def main():
    ok = True
    if os.environ.get("TIMING_ONLY") != "1" and DEVICE == "cuda":
        ok &= check(4096, 8, 2, 128, True, [0, 4096])
        ok &= check(3000, 8, 8, 64, False, [0, 3000])
        ok &= check(6000, 8, 2, 128, True, [0, 1, 700, 700, 4000, 6000])
    tokens = int(os.environ.get("TOKENS", "32768"))
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(tokens, 32, 128, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    d_o = torch.randn(tokens, 32, 128, device=DEVICE, dtype=dtype)
    fwd = timed(lambda: lt.attention(q, k, v, causal=True))
    both = timed(lambda: torch.autograd.grad(lt.attention(q, k, v, causal=True), (q, k, v), d_o))
    print(f"op at {tokens} tokens, 32 heads d128 {dtype} causal on {DEVICE}: forward {fwd:.3f} ms, "
          f"forward+backward {both:.3f} ms")
    parts = breakdown(q, k, v, d_o)
    print("RESULT " + json.dumps({"ok": ok, "device": DEVICE, "seq": tokens, "op_fwd_ms": fwd, "op_fwd_bwd_ms": both, **parts}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

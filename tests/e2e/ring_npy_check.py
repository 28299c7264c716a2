#!/usr/bin/env python3
"""End to end: ring_attention --load/--dump under mpirun against an independent NumPy (float64)
implementation of attention forward and backward. Usage:
  ring_npy_check.py <mpirun command...> -- <ring_attention binary> <np> <layout> [--causal]
"""
import os
import subprocess
import sys
import tempfile

import numpy as np


def attention(q, k, v, causal):
    t, h, d = q.shape
    g = h // k.shape[1]
    kk = np.repeat(k, g, axis=1)
    vv = np.repeat(v, g, axis=1)
    s = np.einsum("ihd,jhd->hij", q, kk) / np.sqrt(d)
    if causal:
        s = np.where(np.tril(np.ones((t, t), dtype=bool))[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    lse = (m + np.log(p.sum(axis=-1, keepdims=True)))[..., 0]
    p = np.exp(s - lse[..., None])
    o = np.einsum("hij,jhd->ihd", p, vv)
    return o, lse, p, kk, vv, g


def grads(q, k, v, do, causal):
    o, lse, p, kk, vv, g = attention(q, k, v, causal)
    d = q.shape[2]
    dv = np.einsum("hij,ihd->jhd", p, do)
    dp = np.einsum("ihd,jhd->hij", do, vv)
    delta = np.einsum("ihd,ihd->hi", do, o)
    ds = p * (dp - delta[..., None]) / np.sqrt(d)
    dq = np.einsum("hij,jhd->ihd", ds, kk)
    dk = np.einsum("hij,ihd->jhd", ds, q)
    t, hkv = k.shape[0], k.shape[1]
    dk = dk.reshape(t, hkv, g, d).sum(axis=2)
    dv = dv.reshape(t, hkv, g, d).sum(axis=2)
    return o, lse, dq, dk, dv


def main():
    sep = sys.argv.index("--")
    mpirun = sys.argv[1:sep]
    binary, np_, layout = sys.argv[sep + 1:sep + 4]
    causal = "--causal" in sys.argv[sep + 4:]
    rng = np.random.default_rng()
    t, h, hkv, d = int(rng.integers(150, 260)), 4, 2, 32
    q = rng.uniform(-1, 1, (t, h, d)).astype(np.float32)
    k = rng.uniform(-1, 1, (t, hkv, d)).astype(np.float32)
    v = rng.uniform(-1, 1, (t, hkv, d)).astype(np.float32)
    do = rng.uniform(-1, 1, (t, h, d)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name, a in (("q", q), ("k", k), ("v", v), ("do", do)):
            np.save(os.path.join(tmp, name + ".npy"), a)
        cmd = mpirun + ["-np", np_, binary, "--load", tmp, "--dump", tmp, "--layout", layout, "--backward"]
        if causal:
            cmd.append("--causal")
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            print(run.stdout, run.stderr)
            sys.exit(f"ring_attention failed with exit code {run.returncode}")
        assert "RESULT {" in run.stdout.splitlines()[-1], "last line is not RESULT"
        got = {n: np.load(os.path.join(tmp, n + ".npy")) for n in ("o", "lse", "dq", "dk", "dv")}
    want = dict(zip(("o", "lse", "dq", "dk", "dv"), grads(*(x.astype(np.float64) for x in (q, k, v, do)), causal)))
    worst = 0.0
    for n in want:
        assert got[n].shape == want[n].shape, f"{n}: shape {got[n].shape} != {want[n].shape}"
        err = float(np.max(np.abs(got[n] - want[n])) / max(1.0, float(np.max(np.abs(want[n])))))
        print(f"{n}: max relative error {err:.2e}")
        worst = max(worst, err)
    if worst > 1e-4:
        sys.exit(f"mismatch against NumPy: {worst:.2e}")
    print(f"OK: T={t} layout={layout} np={np_} causal={causal}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""ring_attention refuses bad input with one readable line and a non-zero exit on every rank,
within a deadline (never a hang), whether the flags, the files, the memory or the devices are
wrong. Usage: ring_bad_input.py <mpirun command...> -- <binary>"""
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sep = sys.argv.index("--")
mpirun, binary = sys.argv[1:sep], sys.argv[sep + 1]
tmp = tempfile.mkdtemp()
np.save(f"{tmp}/q.npy", np.ones((10, 4, 8), np.float32))
np.save(f"{tmp}/k.npy", np.ones((10, 2, 8), np.float32))
np.save(f"{tmp}/v.npy", np.ones((9, 2, 8), np.float32))  # mismatched
os.makedirs(f"{tmp}/f64")
for n in ("q", "k", "v"):
    np.save(f"{tmp}/f64/{n}.npy", np.ones((10, 2, 8), np.float64))

cases = [
    (["--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    (["--layout", "diagonal"], "unknown layout"),
    (["--seq-len", "12x"], "needs an integer"),
    (["--seq-len", "0"], "outside"),
    (["--frobnicate"], "unknown flag"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--load", f"{tmp}/nowhere"], "cannot open"),
    (["--load", tmp], "shapes differ"),
    (["--load", f"{tmp}/f64"], "not float32"),
    (["--backend", "tpu"], "unknown or unavailable backend"),
]
rng = np.random.default_rng()


def save_inputs(folder, t, h, hkv, d, edit=None):
    """Random q, k, v (and do) of the given shape; edit(name, array) may spoil one of them."""
    os.makedirs(folder, exist_ok=True)
    for name, heads in (("q", h), ("k", hkv), ("v", hkv), ("do", h)):
        a = rng.uniform(-1, 1, (t, heads, d)).astype(np.float32)
        if edit:
            edit(name, a)
        np.save(f"{folder}/{name}.npy", a)


def spoil(tensor, value, at):
    def edit(name, a):
        if name == tensor:
            a[at] = value
    return edit


# One non-finite (or, in fp16, too large) element at a random place: named with file and index.
t_bad = int(rng.integers(5, 12))
bad_at = (int(rng.integers(0, t_bad)), int(rng.integers(0, 4)), int(rng.integers(0, 8)))
bad_index = f"[token {bad_at[0]}, head {bad_at[1]}, dim {bad_at[2]}]"
save_inputs(f"{tmp}/nan_q", t_bad, 4, 2, 8, spoil("q", np.nan, bad_at))
save_inputs(f"{tmp}/inf_k", t_bad, 4, 2, 8, spoil("k", np.inf, (bad_at[0], bad_at[1] % 2, bad_at[2])))
save_inputs(f"{tmp}/big_v", t_bad, 4, 2, 8, spoil("v", 1e6, (bad_at[0], bad_at[1] % 2, bad_at[2])))
save_inputs(f"{tmp}/empty", 0, 4, 2, 8)
save_inputs(f"{tmp}/good", t_bad, 4, 2, 8)

cases += [
    # Non-finite inputs are refused (the ring path's policy), naming file, tensor and index.
    (["--load", f"{tmp}/nan_q", "--check"], f"nan_q/q.npy: element {bad_index} is nan"),
    (["--load", f"{tmp}/inf_k", "--check"], f"inf_k/k.npy: element [token {bad_at[0]}, head {bad_at[1] % 2}, dim {bad_at[2]}] is inf"),
    (["--load", f"{tmp}/big_v", "--dtype", "fp16"], "does not fit in fp16"),
    # A file without tokens: one line, like a bad flag (no per-rank errors, no MPI_ABORT).
    (["--load", f"{tmp}/empty"], "is empty"),
    # Shape flags that contradict the files.
    (["--load", f"{tmp}/good", "--seq-len", str(t_bad + 1)], f"--seq-len {t_bad + 1} contradicts"),
    (["--load", f"{tmp}/good", "--heads", "2"], "--heads 2 contradicts"),
    (["--load", f"{tmp}/good", "--kv-heads", "1"], "--kv-heads 1 contradicts"),
    # More memory than the host has: refused with the numbers before anything that size is built.
    (["--seq-len", "400000000"], "needs about"),
    (["--seq-len", "2147483647", "--check"], "needs about"),
    # --device cuda where it cannot run names the cause (the build or the machine), not both.
    (["--device", "cuda"], re.compile(r"--device cuda: (this longattn was built without (CUDA|NCCL)|no CUDA GPU is visible)")),
]


def limit_memory():
    # A safety net for the machine running the tests: a rank that builds something the size of
    # the whole sequence fails here instead of swapping the host.
    resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30))


# AddressSanitizer maps terabytes of shadow memory at start, which the limit would refuse.
with open(binary, "rb") as f:
    sanitized = b"__asan_init" in f.read()


def run_job(args, env=None):
    start = time.monotonic()
    run = subprocess.run(mpirun + ["-np", "2", binary] + args, capture_output=True, text=True, timeout=120,
                         env=env, preexec_fn=None if sanitized else limit_memory)
    lines = [l for l in run.stderr.splitlines() if l.startswith("ring_attention: error")]
    return run, lines, time.monotonic() - start


failed = 0
for args, needle in cases:
    if "--device" not in args:
        args = ["--device", "cpu"] + args
    run, lines, seconds = run_job(args)
    if args[:2] == ["--device", "cuda"] and run.returncode == 0:
        print(f"ok  {' '.join(args)} -> ran (this machine has a GPU)")
        continue
    found = len(lines) == 1 and (needle.search(lines[0]) if isinstance(needle, re.Pattern) else needle in lines[0])
    ok = run.returncode != 0 and found and "MPI_ABORT" not in run.stderr and seconds < 60
    print(f"{'ok ' if ok else 'BAD'} {' '.join(args)} -> rc={run.returncode} {seconds:.1f}s {lines[:3]}")
    failed += not ok

# The shape flags may repeat what the files say.
run, lines, _ = run_job(["--device", "cpu", "--load", f"{tmp}/good", "--seq-len", str(t_bad), "--heads", "4", "--kv-heads", "2"])
ok = run.returncode == 0 and not lines
print(f"{'ok ' if ok else 'BAD'} flags that agree with the files -> rc={run.returncode} {lines[:2]}")
failed += not ok

# --backend and LONGATTN_BACKEND: one line each, and the same list of choices.
choices = []
for args, env in ((["--backend", "tpu"], None), ([], dict(os.environ, LONGATTN_BACKEND="tpu"))):
    run, lines, _ = run_job(["--device", "cpu", "--seq-len", "64"] + args, env)
    got = lines[0].split("choices here: ", 1)[1] if len(lines) == 1 and "choices here: " in lines[0] else None
    ok = run.returncode != 0 and got is not None and "MPI_ABORT" not in run.stderr
    print(f"{'ok ' if ok else 'BAD'} backend 'tpu' via {'--backend' if args else 'LONGATTN_BACKEND'} -> rc={run.returncode} {lines[:3]}")
    failed += not ok
    choices.append(got)
ok = choices[0] is not None and choices[0] == choices[1] and "auto" in choices[0] and "cpu" in choices[0]
print(f"{'ok ' if ok else 'BAD'} --backend and LONGATTN_BACKEND list the same choices: {choices}")
failed += not ok

# Arguments that differ between ranks (MPMD launch): named, not hung.
run = subprocess.run(mpirun + ["-np", "1", binary, "--device", "cpu", "--seq-len", "64", ":", "-np", "1", binary, "--device", "cpu", "--seq-len", "65"],
                     capture_output=True, text=True, timeout=120)
ok = run.returncode != 0 and "differ between ranks" in run.stderr
print(f"{'ok ' if ok else 'BAD'} differing ranks -> rc={run.returncode}")
failed += not ok
sys.exit(1 if failed else 0)

#!/usr/bin/env python3
"""ring_attention refuses bad input with one readable line and a non-zero exit on every rank,
within a deadline (never a hang). Usage: ring_bad_input.py <mpirun command...> -- <binary>"""
import os
import subprocess
import sys
import tempfile

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
failed = 0
for args, needle in cases:
    run = subprocess.run(mpirun + ["-np", "2", binary, "--device", "cpu"] + args, capture_output=True, text=True, timeout=120)
    lines = [l for l in run.stderr.splitlines() if l.startswith("ring_attention: error")]
    ok = run.returncode != 0 and len(lines) == 1 and needle in lines[0]
    print(f"{'ok ' if ok else 'BAD'} {' '.join(args)} -> rc={run.returncode} {lines[:2]}")
    failed += not ok
# Arguments that differ between ranks (MPMD launch): named, not hung.
run = subprocess.run(mpirun + ["-np", "1", binary, "--device", "cpu", "--seq-len", "64", ":", "-np", "1", binary, "--device", "cpu", "--seq-len", "65"],
                     capture_output=True, text=True, timeout=120)
ok = run.returncode != 0 and "differ between ranks" in run.stderr
print(f"{'ok ' if ok else 'BAD'} differing ranks -> rc={run.returncode}")
failed += not ok
sys.exit(1 if failed else 0)

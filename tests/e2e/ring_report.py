#!/usr/bin/env python3
"""What ring_attention tells its user: the token count (with ranks that hold none), progress lines
that name the iteration, progress of the --check oracle, one table of medians whose columns are
explained, a RESULT line that is valid JSON, and a --check that never passes a non-finite output.
Usage: ring_report.py <mpirun command...> -- <ring_attention binary>"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sep = sys.argv.index("--")
mpirun, binary = sys.argv[1:sep], sys.argv[sep + 1]
rng = np.random.default_rng()
failed = 0


def run(np_, args, env=None):
    proc = subprocess.run(mpirun + ["-np", str(np_), binary, "--device", "cpu"] + args, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **(env or {})))
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    result = None
    if last.startswith("RESULT "):
        try:
            result = json.loads(last[len("RESULT "):])
        except ValueError as e:
            print(f"RESULT is not JSON ({e}): {last}")
    return proc, result


def expect(ok, what, detail=""):
    global failed
    print(f"{'ok ' if ok else 'BAD'} {what}{'' if ok else ': ' + detail}")
    failed += not ok


# One token over two ranks: the count reads right and the empty rank is named.
proc, result = run(2, ["--seq-len", "1", "--heads", "2", "--head-dim", "8"])
expect(proc.returncode == 0 and "1 token (0 to 1 per rank; 1 rank holds none)" in proc.stderr + proc.stdout,
       "one token, one empty rank", proc.stderr[-600:])

# Uneven shards: the range of tokens per rank, not rank 0's count as everyone's.
t = 3 * int(rng.integers(20, 40)) + 1
proc, result = run(3, ["--seq-len", str(t), "--heads", "2", "--head-dim", "8", "--layout", "contiguous"])
expect(proc.returncode == 0 and f"{t} tokens ({t // 3} to {t // 3 + 1} per rank)" in proc.stderr + proc.stdout,
       "uneven shards give a range per rank", proc.stderr[-600:])

# Several iterations, with a check: progress names the iteration (at debug level for a small run),
# the oracle reports its progress, and the table says what its columns are.
iters = int(rng.integers(2, 4))
t = int(rng.integers(100, 200))
proc, result = run(2, ["--seq-len", str(t), "--heads", "2", "--head-dim", "16", "--causal", "--layout", "contiguous",
                       "--backward", "--check", "--iters", str(iters)], env={"LONGATTN_LOG": "debug"})
out = proc.stdout + proc.stderr
expect(proc.returncode == 0 and result is not None and result["check"] == "passed", "the job runs and passes", out[-800:])
for phase in ("forward", "backward"):
    expect(f"{phase} iteration {iters}/{iters}, step 2/2" in out, f"{phase} progress names the iteration", out[-800:])
    expect(f"check: oracle {phase} {t}/{t} query rows" in out, f"the oracle's {phase} reports progress", out[-800:])
expect(f"median over {iters} iterations, slowest rank" in proc.stdout, "the table says its times are medians", proc.stdout)
expect("skipped steps: of the 2 ring steps per pass" in proc.stdout, "the table explains skipped steps", proc.stdout)
if result:
    expect(result.get("iters") == iters, "RESULT names the iterations", str(result))
    expect(result["fwd_compute_ms"] <= result["fwd_ms"], "median compute within median wall time", str(result))
    # Contiguous and causal over two ranks: rank 0's queries see nothing of rank 1's keys.
    expect(result.get("fwd_skipped_steps") == 1, "the skipped step is counted", str(result))

# Finite inputs whose scores overflow fp32: --check fails, says why, and RESULT stays valid JSON.
with tempfile.TemporaryDirectory() as tmp:
    t = int(rng.integers(20, 60))
    for name, heads in (("q", 2), ("k", 1), ("v", 1)):
        a = rng.uniform(-1, 1, (t, heads, 8)).astype(np.float32)
        if name != "v":
            a *= np.float32(3e19)
        np.save(f"{tmp}/{name}.npy", a)
    proc, result = run(2, ["--load", tmp, "--check", "--causal"])
    expect(proc.returncode == 3 and result is not None and result["check"] == "failed",
           "a non-finite output fails --check with valid JSON", proc.stdout[-600:] + proc.stderr[-600:])
    expect("non-finite value" in proc.stderr + proc.stdout, "the failure names the non-finite values", proc.stderr[-600:])

sys.exit(1 if failed else 0)

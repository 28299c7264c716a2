#!/usr/bin/env python3
"""longattn-bench ring --strategy on 4 CPU ranks simulated as 2 nodes of 2: one row per strategy and
length, each naming what ran (auto with a slow-network machine file runs hybrid 2x2), with positive
rates and the process's peak memory, and the table labelling auto's pick.
Usage: bench_ring_strategies.py <mpirun command...> -- <longattn-bench binary>"""
import json
import os
import random
import subprocess
import sys
import tempfile

sep = sys.argv.index("--")
mpirun, binary = sys.argv[1:sep], sys.argv[sep + 1]
failed = 0


def expect(ok, what, detail=""):
    global failed
    print(f"{'ok ' if ok else 'BAD'} {what}{'' if ok else ': ' + detail}")
    failed += not ok


lengths = [64 * random.randint(3, 8), 64 * random.randint(9, 12)]
with tempfile.TemporaryDirectory() as tmp:
    machine = os.path.join(tmp, "slow_network.machine")
    with open(machine, "w") as f:
        f.write(f"link intra_node {random.uniform(200, 800):.1f} 2\nlink inter_node {random.uniform(0.001, 0.01):.4f} 500\n"
                "linear_seconds_per_token 0\n")
    proc = subprocess.run(mpirun + ["-np", "4", binary, "ring", "--device", "cpu", "--seq-lens", ",".join(map(str, lengths)),
                                    "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--iters", "1",
                                    "--strategy", "ring,ulysses,hybrid,auto", "--machine-file", machine],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, LONGATTN_NODE_SIZE="2", OMP_NUM_THREADS="1"))
out = proc.stdout.strip().splitlines()
result = None
if out and out[-1].startswith("RESULT "):
    result = json.loads(out[-1][len("RESULT "):])
expect(proc.returncode == 0 and result is not None, "the bench runs and ends with RESULT", (proc.stdout + proc.stderr)[-1500:])
if result:
    rows = result["rows"]
    expect(len(rows) == 8, "one row per length and strategy", str(len(rows)))
    want = [("ring", "ring", 1), ("ulysses", "ulysses", 4), ("hybrid", "hybrid", 2), ("auto", "hybrid", 2)]
    for i, row in enumerate(rows):
        requested, strategy, ulysses = want[i % 4]
        what = f"{row['seq_len']} {requested}"
        expect(row["seq_len"] == lengths[i // 4], f"{what}: the length", str(row))
        expect(row["requested_strategy"] == requested and row["strategy"] == strategy, f"{what}: names what ran", str(row))
        expect(row["ulysses_size"] == ulysses and row["ring_size"] == 4 // ulysses, f"{what}: U and R", str(row))
        expect(row["fwd_tflops_per_rank"] > 0 and row["fwdbwd_tflops_per_rank"] > 0, f"{what}: positive rates", str(row))
        expect(row["peak_host_mib"] is not None and row["peak_host_mib"] > 0 and row["gpu_mem_gib"] is None,
               f"{what}: the peak host memory, no GPU memory", str(row))
    expect(sum("auto: hybrid 2x2" in line for line in out) == 2, "the table labels auto's pick", proc.stdout[-1500:])

print("FAILED" if failed else "all passed")
sys.exit(1 if failed else 0)

#!/usr/bin/env python3
"""ring_attention's --strategy on 4 CPU ranks simulated as 2 nodes of 2 (LONGATTN_NODE_SIZE=2):
ring, ulysses, hybrid (U given and U = 0, one node) and auto each pass --check (forward and backward,
GQA, odd length, fresh seed) and name in RESULT what ran; auto with a machine file whose network is
slow picks what its logged candidates rank first; flags a strategy would ignore, sizes it cannot
run and a malformed machine file are one line and exit 2.
Usage: ring_strategies.py <mpirun command...> -- <ring_attention binary>"""
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

sep = sys.argv.index("--")
mpirun, binary = sys.argv[1:sep], sys.argv[sep + 1]
rng = np.random.default_rng()
failed = 0
ENV = {"LONGATTN_NODE_SIZE": "2", "OMP_NUM_THREADS": "1"}


def run(args):
    proc = subprocess.run(mpirun + ["-np", "4", binary, "--device", "cpu"] + args, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **ENV))
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


t = 2 * int(rng.integers(60, 120)) + 1
seed = str(int(rng.integers(1, 1 << 30)))
shape = ["--seq-len", str(t), "--heads", "8", "--kv-heads", "2", "--head-dim", "16", "--causal", "--backward", "--check",
         "--seed", seed]
print(f"seq_len {t}, seed {seed}")
for flags, strategy, ulysses in ((["--strategy", "ring"], "ring", 1), (["--strategy", "ulysses"], "ulysses", 4),
                                 (["--strategy", "hybrid", "--ulysses-size", "2"], "hybrid", 2),
                                 (["--strategy", "hybrid"], "hybrid", 2)):
    proc, result = run(shape + flags)
    what = " ".join(flags)
    expect(proc.returncode == 0 and result is not None and result["check"] == "passed", f"{what}: --check passes",
           (proc.stdout + proc.stderr)[-800:])
    if result:
        expect(result["strategy"] == strategy and result["requested_strategy"] == flags[1], f"{what}: RESULT names it", str(result))
        expect(result["ulysses_size"] == ulysses and result["ring_size"] == 4 // ulysses, f"{what}: RESULT has U and R", str(result))
        expect(f"strategy {strategy}: U = {ulysses}, R = {4 // ulysses}" in proc.stdout, f"{what}: the table names U and R",
               proc.stdout)

# auto: the candidates are logged, the one marked is what ran, and it passes --check.
with tempfile.TemporaryDirectory() as tmp:
    machine = os.path.join(tmp, "slow_network.machine")
    with open(machine, "w") as f:
        f.write(f"# a fast node, a slow network\nlink intra_node {rng.uniform(200, 800):.1f} 2\n"
                f"link inter_node {rng.uniform(0.001, 0.01):.4f} 500\nlinear_seconds_per_token 0\n")
    proc, result = run(shape + ["--strategy", "auto", "--machine-file", machine])
    out = proc.stdout + proc.stderr
    expect(proc.returncode == 0 and result is not None and result["check"] == "passed", "auto: --check passes", out[-800:])
    chosen = re.search(r"\* (ring|ulysses|hybrid \d+ x \d+) +modelled fwd", out)
    candidates = re.findall(r"  [* ] (ring|ulysses|hybrid \d+ x \d+) +modelled fwd ([0-9.]+) ms, bwd ([0-9.]+) ms", out)
    expect(chosen is not None and len(candidates) == 3, "auto logs its three candidates, one marked", out[-1500:])
    if chosen and candidates and result:
        best = min(candidates, key=lambda c: float(c[1]) + float(c[2]))
        expect(chosen.group(1) == best[0], "auto marks the fastest modelled candidate", str(candidates))
        ran = result["strategy"] if result["strategy"] != "hybrid" else f"hybrid {result['ulysses_size']} x {result['ring_size']}"
        expect(ran == chosen.group(1), "auto runs the candidate it marked", f"{ran} vs {chosen.group(1)}")
        # Crossing the slow network as little as possible: one Ulysses group per node.
        expect(result["strategy"] == "hybrid" and result["ulysses_size"] == 2, "a slow network gives hybrid 2 x 2", str(result))
        expect(f"inter-node link from {machine}" in out, "the reason says where the links came from", out[-1500:])

    with open(machine, "w") as f:
        f.write("link intra_node 300 2\nlink inter_node 25 10 20\n")
    proc, _ = run(["--seq-len", "64", "--strategy", "auto", "--machine-file", machine])
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    expect(proc.returncode != 0 and len(errors) == 1 and f"{machine}:2:" in errors[0],
           "a malformed machine file: one line naming file:line", proc.stderr[-800:])

for flags, words in ((["--strategy", "ring", "--ulysses-size", "2"], "--ulysses-size applies to --strategy hybrid only"),
                     (["--strategy", "ulysses", "--machine-file", "m"], "--machine-file is read by --strategy auto only"),
                     (["--strategy", "hybrid", "--ulysses-size", "3"], "Ulysses sizes that can: 1, 2, 4"),
                     (["--strategy", "sideways"], "use ring, ulysses, hybrid or auto")):
    proc, _ = run(["--seq-len", "64"] + flags)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    expect(proc.returncode != 0 and len(errors) == 1 and words in errors[0], f"{' '.join(flags)}: one line saying why",
           proc.stderr[-800:])

print("FAILED" if failed else "all passed")
sys.exit(1 if failed else 0)

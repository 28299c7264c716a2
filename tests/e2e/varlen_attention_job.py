#!/usr/bin/env python3
"""varlen_attention on 4 CPU ranks simulated as 2 nodes of 2 (LONGATTN_NODE_SIZE=2): fresh random
length lists (an empty and a one-token sequence, one sequence longer than all others together) pass
--check forward and backward under each executable balance, with the RESULT keys the issue asks
for and figures that add up; a cap and the h200 model make the long sequence run as a hybrid group
across the nodes; flat-minheap, a negative length and a mismatched --load are one line and exit 2.
Usage: varlen_attention_job.py <mpirun command...> -- <varlen_attention binary>"""
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
ENV = {"LONGATTN_NODE_SIZE": "2", "OMP_NUM_THREADS": "1"}
KEYS = ["attention_flops_max", "attention_flops_mean", "tokens_max", "tokens_mean", "bytes_intra_node", "bytes_inter_node",
        "modelled_step_ms", "planner_ms", "remap_bytes", "check"]


def run(args):
    proc = subprocess.run(mpirun + ["-np", "4", binary] + args, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **ENV))
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    result = json.loads(last[len("RESULT "):]) if last.startswith("RESULT ") else None
    return proc, result


def expect(ok, what, detail=""):
    global failed
    print(f"{'ok ' if ok else 'BAD'} {what}{'' if ok else ': ' + detail}")
    failed += not ok


def lengths():
    short = [0, 1] + [int(x) for x in rng.integers(2, 200, size=int(rng.integers(3, 8)))]
    short.insert(int(rng.integers(0, len(short) + 1)), 2 * sum(short) + int(rng.integers(2, 100)))
    return short


seed = str(int(rng.integers(1, 1 << 30)))
for balance in ["hierarchical", "per-sequence-zigzag", "whole-sequences"]:
    lens = lengths()
    args = ["--seq-lens", ",".join(map(str, lens)), "--balance", balance, "--causal", "--backward", "--check", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "16", "--seed", seed]
    proc, result = run(args)
    what = f"{balance} {lens}"
    expect(proc.returncode == 0 and result is not None, what + " runs", proc.stderr[-2000:])
    if result is None:
        continue
    expect(all(k in result for k in KEYS), what + " RESULT keys", str(result))
    expect(result["check"].startswith("passed"), what + " --check", result["check"])
    expect(result["tokens"] == sum(lens) and abs(result["tokens_mean"] * 4 - sum(lens)) < 1e-6, what + " tokens", str(result))
    pairs = sum(l * (l + 1) / 2 for l in lens)
    expect(abs(result["attention_flops_mean"] * 4 - 4 * 16 * 4 * pairs) <= 1e-4 * pairs * 256, what + " FLOPs add up", str(result))
    if balance == "whole-sequences":
        expect(result["bytes_intra_node"] == 0 and result["bytes_inter_node"] == 0, what + " sends nothing in attention", str(result))
    if balance == "per-sequence-zigzag":
        expect(result["bytes_inter_node"] > 0, what + " crosses nodes", str(result))

# A cap below the long sequence and the h200 model: a group of several ranks, a hybrid across nodes.
lens = [0, 1, 300, 9000, 900, 64, 2000, 17, 700, 1200, 40, 3000]
proc, result = run(["--seq-lens", ",".join(map(str, lens)), "--causal", "--check", "--heads", "8", "--kv-heads", "2",
                    "--head-dim", "16", "--machine", "h200", "--cap-tokens", "5000", "--seed", seed])
expect(result is not None and result["groups_hybrid"] >= 1 and result["check"].startswith("passed"), "hybrid group checked",
       proc.stdout[-1500:] + proc.stderr[-1500:])


def refused(args, text, what):
    proc, _ = run(args)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("varlen_attention: error:")]
    expect(proc.returncode != 0 and len(lines) == 1 and text in lines[0], what, proc.stderr[-1500:])


refused(["--seq-lens", "5,9,3", "--balance", "flat-minheap"], "longattn-bench balance", "flat-minheap refused")
refused(["--seq-lens", "5,-9,3"], "negative length", "negative length refused")
refused(["--seq-lens", "5000,9", "--cap-tokens", "100"], "raise the cap", "a sequence over the cap refused")
with tempfile.TemporaryDirectory() as d:
    np.save(os.path.join(d, "cu_seqlens.npy"), np.array([0, 7, 5, 20], dtype=np.float32))
    refused(["--load", d], "must not decrease", "non-monotone cu_seqlens refused")
    np.save(os.path.join(d, "cu_seqlens.npy"), np.array([0, 7, 7, 20, 26], dtype=np.float32))
    proc, result = run(["--load", d, "--check", "--heads", "2", "--head-dim", "8"])
    expect(result is not None and result["sequences"] == 4 and result["check"].startswith("passed"), "--load cu_seqlens.npy",
           proc.stderr[-1500:])
sys.exit(1 if failed else 0)

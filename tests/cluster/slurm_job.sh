#!/usr/bin/env bash
# The Slurm batch script for real: a one-node Slurm (cluster/slurm-one-node.sh: munged, slurmctld,
# slurmd) runs cluster/slurm-ring-attention.sbatch through `sbatch --wait`, srun starts 4 ranks over
# PMIx, and the job's RESULT line must show 4 ranks and a passed check against the double-precision
# oracle (causal zigzag, GQA, forward and backward). Where the example has --strategy, a second job
# runs the hybrid with U = 0, which must come out as the whole node (U = 4) from srun's placement.
#
# usage: slurm_job.sh <ring_attention binary>
# Exits 77 (ctest's skip) with the reason where Slurm cannot be started here.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: slurm_job.sh <ring_attention binary>" >&2
  exit 2
fi
ring_attention=$1
here=$(cd "$(dirname "$0")" && pwd)
cluster=$(cd "$here/../../cluster" && pwd)
job_limit_s=120  # sbatch --wait; the whole test stays below ctest's timeout, so every trap runs

work=$(mktemp -d "${TMPDIR:-/tmp}/longattn-slurm-job.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # the job writes its output here

tasks=4
seq_len=1030
# submit <name> <ring_attention flags...>: one sbatch --wait of the batch script on a fresh one-node
# Slurm; the job's stdout lands in $work/<name>.out. Returns the rig's status (77: no Slurm here).
submit() {
  local name=$1
  shift
  RING_ATTENTION=$ring_attention OMP_NUM_THREADS=1 LONGATTN_COMM_TIMEOUT_S=60 \
    "$cluster/slurm-one-node.sh" --cpus "$tasks" -- \
    timeout --kill-after=10 "$job_limit_s" \
    sbatch --wait --quiet --job-name="longattn-$name" --output="$work/$name.out" --error="$work/$name.err" \
    --nodes=1 --ntasks-per-node="$tasks" --gpus-per-node=0 --cpus-per-task=1 --time=3 \
    "$cluster/slurm-ring-attention.sbatch" \
    --device cpu --dtype fp32 --seq-len "$seq_len" --heads 4 --kv-heads 2 --head-dim 32 --layout zigzag \
    --causal --backward --check --check-oracle reference --seed "$((RANDOM + 1))" "$@"
}

# check <name> <status> <expectations...>: the job's exit status and its RESULT line.
check() {
  local name=$1 status=$2
  shift 2
  if [ "$status" -eq 77 ]; then
    echo "SKIP: Slurm cannot be started on this machine (the reason is above)"
    exit 77
  fi
  if [ "$status" -ne 0 ]; then
    echo "FAIL: $name: the Slurm job exited with $status$([ "$status" -eq 124 ] && echo " (timed out after ${job_limit_s}s)")"
    for f in "$name.out" "$name.err"; do [ -f "$work/$f" ] && { echo "--- $f"; tail -n 25 "$work/$f"; }; done
    exit 1
  fi
  if ! python3 "$here/result_check.py" "$work/$name.out" ranks="$tasks" seq_len="$seq_len" heads=4 kv_heads=2 \
       layout='"zigzag"' causal=true check='"passed"' check_oracle='"reference"' "$@"; then
    echo "FAIL: $name: unexpected RESULT from the Slurm job"
    tail -n 25 "$work/$name.out" "$work/$name.err"
    exit 1
  fi
}

status=0
submit ring || status=$?
check ring "$status"
if "$ring_attention" --help 2>/dev/null | grep -q -- "--strategy"; then
  # U = 0 is the node size: all 4 ranks that srun placed on the one node, so no ring across nodes.
  status=0
  submit hybrid --strategy hybrid --ulysses-size 0 || status=$?
  check hybrid "$status" strategy='"hybrid"' ulysses_size="$tasks" ring_size=1
fi
echo "slurm_job: the sbatch script ran $tasks ranks through srun and passed its check"

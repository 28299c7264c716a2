#!/usr/bin/env bash
# The Slurm batch script for real: a one-node Slurm (cluster/slurm-one-node.sh: munged, slurmctld,
# slurmd) runs cluster/slurm-ring-attention.sbatch through `sbatch --wait`, srun starts 4 ranks over
# PMIx, and the job's RESULT line must show 4 ranks and a passed check against the double-precision
# oracle (causal zigzag, GQA, forward and backward).
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
status=0
RING_ATTENTION=$ring_attention OMP_NUM_THREADS=1 LONGATTN_COMM_TIMEOUT_S=60 \
  "$cluster/slurm-one-node.sh" --cpus "$tasks" -- \
  timeout --kill-after=10 "$job_limit_s" \
  sbatch --wait --quiet --job-name=longattn-test --output="$work/job.out" --error="$work/job.err" \
  --nodes=1 --ntasks-per-node="$tasks" --gpus-per-node=0 --cpus-per-task=1 --time=3 \
  "$cluster/slurm-ring-attention.sbatch" \
  --device cpu --dtype fp32 --seq-len "$seq_len" --heads 4 --kv-heads 2 --head-dim 32 --layout zigzag \
  --causal --backward --check --check-oracle reference --seed "$((RANDOM + 1))" || status=$?

if [ $status -eq 77 ]; then
  echo "SKIP: Slurm cannot be started on this machine (the reason is above)"
  exit 77
fi
if [ $status -ne 0 ]; then
  echo "FAIL: the Slurm job exited with $status$([ $status -eq 124 ] && echo " (timed out after ${job_limit_s}s)")"
  for f in job.out job.err; do [ -f "$work/$f" ] && { echo "--- $f"; tail -n 25 "$work/$f"; }; done
  exit 1
fi
if ! python3 "$here/result_check.py" "$work/job.out" ranks="$tasks" seq_len="$seq_len" heads=4 kv_heads=2 \
     layout='"zigzag"' causal=true check='"passed"' check_oracle='"reference"'; then
  echo "FAIL: unexpected RESULT from the Slurm job"
  tail -n 25 "$work/job.out" "$work/job.err"
  exit 1
fi
echo "slurm_job: the sbatch script ran $tasks ranks through srun and passed its check"

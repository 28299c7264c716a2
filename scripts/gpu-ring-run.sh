#!/usr/bin/env bash
# On a machine with 2+ GPUs (nvidia-h200-x2): build, check the GPU ring against one GPU and the CPU
# oracle for every layout, benchmark the ring next to PyTorch context parallel, run the 1M-token
# forward+backward; logs under $OUT, a short table last. Usage: scripts/gpu-ring-run.sh [NP]
set -uo pipefail
NP=${1:-2}
OUT=${OUT:-/tmp/longattn-ring-out}
BUILD=${BUILD:-$(pwd)/build-gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MPIRUN="mpirun --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE -x LONGATTN_LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt"; date -u >> "$OUT/device.txt"; cat "$OUT/device.txt"

cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLONGATTN_CUDA=ON > "$OUT/configure.log" 2>&1 || { tail -20 "$OUT/configure.log"; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" --target ring_attention longattn-bench > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }

# Correctness: NP GPUs vs 1 GPU vs the CPU oracle, odd length, GQA, every layout, both head dims.
status=0
for layout in contiguous zigzag striped; do
  for d in 64 128; do
    args="--device cuda --seq-len 1999 --heads 4 --kv-heads 2 --head-dim $d --layout $layout --causal --backward --check --check-oracle reference"
    mkdir -p "$OUT/np$NP-$layout-$d" "$OUT/np1-$layout-$d"
    $MPIRUN -np "$NP" "$BUILD/bin/ring_attention" $args --dump "$OUT/np$NP-$layout-$d" > "$OUT/check-np$NP-$layout-$d.log" 2>&1 || status=1
    $MPIRUN -np 1 "$BUILD/bin/ring_attention" $args --dump "$OUT/np1-$layout-$d" > "$OUT/check-np1-$layout-$d.log" 2>&1 || status=1
    python3 - "$OUT/np$NP-$layout-$d" "$OUT/np1-$layout-$d" <<'PY' || status=1
import sys, numpy as np
a, b = sys.argv[1], sys.argv[2]
worst = max(float(np.max(np.abs(np.load(f"{a}/{n}.npy") - np.load(f"{b}/{n}.npy")))) for n in ("o", "lse", "dq", "dk", "dv"))
print(f"{a.split('/')[-1]} vs 1 GPU: max abs diff {worst:.3e}")
sys.exit(0 if worst < 5e-2 else 1)
PY
    grep -h RESULT "$OUT/check-np$NP-$layout-$d.log" | grep -o '"check":"[a-z]*"' | sed "s/^/$layout d$d np$NP: /"
  done
done
echo "correctness status: $status"

# Scaling: ours and PyTorch context parallel on the same shapes, back to back.
$MPIRUN -np "$NP" "$BUILD/bin/longattn-bench" ring --seq-lens 131072,524288 --iters 3 > "$OUT/bench_ring.log" 2>&1
PYTHONUNBUFFERED=1 torchrun --standalone --nproc_per_node="$NP" bench/peers/torch_context_parallel.py --seqs 131072,524288 > "$OUT/bench_torch_cp.log" 2>&1
# A million tokens, forward and backward, with peak memory.
$MPIRUN -np "$NP" "$BUILD/bin/ring_attention" --device cuda --seq-len 1048576 --heads 32 --head-dim 128 --causal --backward > "$OUT/ring_1m.log" 2>&1

grep -v RESULT "$OUT/bench_ring.log" | tail -4
grep -v RESULT "$OUT/bench_torch_cp.log" | tail -6
grep RESULT "$OUT/ring_1m.log" | cut -c1-600
exit $status

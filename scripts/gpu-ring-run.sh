#!/usr/bin/env bash
# On a machine with 2+ GPUs (nvidia-h200-x2): build; test the NCCL communicator; check the GPU ring
# against one GPU and the CPU oracle for every layout; benchmark the ring next to PyTorch context
# parallel; run the 1M-token forward+backward. Every step has a time limit (a hang costs minutes,
# not the call); logs under $OUT, a short summary last.
#   scripts/gpu-ring-run.sh [NP] [STAGE...]    stages: nccl check 1m wgmma bench peer (default: all but wgmma)
# wgmma runs the Hopper wgmma kernels' GPU tests on GPU 0, so a multi-GPU call can check them too.
set -uo pipefail
NP=${1:-2}
shift || true
STAGES=${*:-nccl check 1m bench peer}
OUT=${OUT:-/tmp/longattn-ring-out}
source "$(dirname "$0")/gpu-build-common.sh"
has() { [[ " $STAGES " == *" $1 "* ]]; }
targets=(ring_attention longattn-bench)
has nccl && targets+=(test_nccl)
has wgmma && targets+=(test_gpu)
gpu_build "${targets[@]}"

# Checks give up after 60 s; the benchmark keeps the default (its one-rank baseline keeps the
# other ranks waiting in a barrier for minutes at 512k).
CHECK_TIMEOUT_S=${CHECK_TIMEOUT_S:-60}
MPIRUN="mpirun --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -x LONGATTN_COMM_TIMEOUT_S -x LONGATTN_LOG -x LONGATTN_LOG_SUBSYS -x LD_LIBRARY_PATH"
export LONGATTN_LOG=${LONGATTN_LOG:-info} LONGATTN_LOG_SUBSYS=${LONGATTN_LOG_SUBSYS:-all}
export LONGATTN_COMM_TIMEOUT_S=${LONGATTN_COMM_TIMEOUT_S:-300}
status=0
summary=()
note() { summary+=("$*"); echo "$*"; }

if has nccl; then
  LONGATTN_COMM_TIMEOUT_S=$CHECK_TIMEOUT_S timeout 120 $MPIRUN -np "$NP" "$BUILD/bin/test_nccl" > "$OUT/test_nccl.log" 2>&1
  rc=$?; [ $rc = 0 ] || status=1
  grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|Failure|error" "$OUT/test_nccl.log" | head -20
  note "test_nccl (np $NP): exit $rc, $(grep -c '\[       OK \]' "$OUT/test_nccl.log") OK lines"
fi

if has wgmma; then
  CUDA_VISIBLE_DEVICES=0 timeout 150 "$BUILD/bin/test_gpu" --gtest_brief=1 --gtest_filter='*WgmmaTile*:*cuda_wgmma*:GpuBackend.Unknown*-*cuda_wgmma_bwd*' \
    > "$OUT/test_gpu_wgmma.log" 2>&1
  rc=$?
  grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|Failure|differs|error" "$OUT/test_gpu_wgmma.log" | head -30
  note "test_gpu wgmma (GPU 0): exit $rc"
fi

# Correctness: NP GPUs vs 1 GPU vs the CPU oracle, odd length, GQA, every layout, both head dims.
if has check; then
  for layout in contiguous zigzag striped; do
    for d in 64 128; do
      args="--device cuda --seq-len 1999 --heads 4 --kv-heads 2 --head-dim $d --layout $layout --causal --backward"
      dumps=/tmp/longattn-ring-dumps  # outside $OUT: the device tool brings back a limited number of files
      mkdir -p "$dumps/np$NP-$layout-$d" "$dumps/np1-$layout-$d"
      LONGATTN_COMM_TIMEOUT_S=$CHECK_TIMEOUT_S timeout 90 $MPIRUN -np "$NP" "$BUILD/bin/ring_attention" $args --check --check-oracle reference --dump "$dumps/np$NP-$layout-$d" \
        > "$OUT/check-np$NP-$layout-$d.log" 2>&1 || status=1
      timeout 60 $MPIRUN -np 1 "$BUILD/bin/ring_attention" $args --dump "$dumps/np1-$layout-$d" > "$OUT/check-np1-$layout-$d.log" 2>&1 || status=1
      verdict=$(grep -h RESULT "$OUT/check-np$NP-$layout-$d.log" | grep -o '"check":"[a-z]*"\|"max_abs_err":[^,]*' | tr '\n' ' ')
      diff=$(python3 - "$dumps/np$NP-$layout-$d" "$dumps/np1-$layout-$d" <<'PY'
import sys, numpy as np
a, b = sys.argv[1], sys.argv[2]
try:
    worst = max(float(np.max(np.abs(np.load(f"{a}/{n}.npy").astype(np.float64) - np.load(f"{b}/{n}.npy").astype(np.float64))))
                for n in ("o", "lse", "dq", "dk", "dv"))
    print(f"vs 1 GPU max abs diff {worst:.3e}" + ("" if worst < 5e-2 else " TOO LARGE"))
except Exception as e:
    print(f"vs 1 GPU: no comparison ({e})")
PY
)
      [[ "$verdict" == *'"check":"passed"'* && "$diff" != *"TOO LARGE"* && "$diff" != *"no comparison"* ]] || status=1
      note "check $layout d$d np$NP: $verdict| $diff"
    done
  done
fi

# A million tokens, forward and backward, with peak memory per rank.
if has 1m; then
  LONGATTN_LOG=${LONGATTN_LOG_1M:-debug} LONGATTN_LOG_SUBSYS=kernels,app timeout 180 $MPIRUN -np "$NP" "$BUILD/bin/ring_attention" --device cuda --seq-len 1048576 --heads 32 --head-dim 128 --causal --backward \
    > "$OUT/ring_1m.log" 2>&1 || status=1
  note "1M tokens: $(grep -h RESULT "$OUT/ring_1m.log" | cut -c1-700)"
  grep -h "GPU memory\|workspace" "$OUT/ring_1m.log" | head -20
  grep -E "error" "$OUT/ring_1m.log" | head -3
fi

# Scaling: ours and PyTorch context parallel on the same shapes, back to back.
SEQS=${SEQS:-131072,524288}
if has bench; then
  timeout 300 $MPIRUN -np "$NP" "$BUILD/bin/longattn-bench" ring --seq-lens "$SEQS" --iters 3 --single-max "${SINGLE_MAX:-524288}" \
    > "$OUT/bench_ring.log" 2>&1 || status=1
fi
if has peer; then
  PYTHONUNBUFFERED=1 timeout 240 torchrun --standalone --nproc_per_node="$NP" bench/peers/torch_context_parallel.py --seqs "$SEQS" \
    --backends "${PEER_BACKENDS:-cudnn}" > "$OUT/bench_torch_cp.log" 2>&1 || status=1
fi
echo "---- summary ----"
for line in "${summary[@]}"; do echo "$line" | cut -c1-400; done
if has bench; then echo "ours (longattn-bench ring, np $NP):"; grep -v RESULT "$OUT/bench_ring.log" | grep -v "^\[" | tail -4; fi
if has peer; then echo "PyTorch context parallel:"; grep -v RESULT "$OUT/bench_torch_cp.log" | grep -E "^(backend|cudnn|flash)" | tail -6; fi
echo "status: $status"
exit $status

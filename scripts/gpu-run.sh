#!/usr/bin/env bash
# On a GPU machine: configure and build the GPU targets, run the GPU tests, then the GPU kernel
# benchmark and PyTorch's SDPA peer back to back; full logs under $OUT; a short side-by-side table
# last. Usage: scripts/gpu-run.sh [quick|full|test|build|wgmma|cudnn-ab|ab|pack-base]
#   quick: seq 8k/32k only; test: no benchmarks; build: build only;
#   wgmma: only the Hopper wgmma kernels' tests and their timing against the mma.sync kernels at
#     8k/32k, head dim 128, for quick iterations on those kernels;
#   cudnn-ab: the cudnn backend and PyTorch's cuDNN path alternately, ROUNDS times (default 4) at
#     SEQS (default 8192,32768), head dim 128, to tell a real gap from run-to-run spread;
#   ab: the own forward kernels of this tree against those of git revision BASE_REV (default
#     938fb34), both built side by side (longattn-bench only, no cuDNN), timed alternately ROUNDS
#     times (default 3) by `longattn-bench gpu-kernels --seqs AB_SEQS --dims 64,128 --backends cuda`
#     for each forward kernel (mma.sync; wgmma with each warpgroup schedule), plus this tree's GPU
#     forward tests; a before/after table of medians last. Without git history on the GPU machine
#     it reads the base tree from build-ab-base/BASE_REV.tar: run `scripts/gpu-run.sh pack-base`
#     where the repository is, and carry build-ab-base.
# BUILD=dir and CUDA_FLAGS="-D..." build a variant (tile knobs in kernels/cuda/flash_tiles.hpp)
# beside the default one.
set -uo pipefail
MODE=${1:-full}
BASE_REV=${BASE_REV:-938fb34}
BASE_TAR=build-ab-base/$BASE_REV.tar
if [ "$MODE" = pack-base ]; then  # here, where the git history is: the base tree for mode ab
  mkdir -p build-ab-base && git archive -o "$BASE_TAR" "$BASE_REV" || exit 1
  echo "wrote $BASE_TAR; name build-ab-base in the run's carry list"
  exit 0
fi
[ "$MODE" = ab ] && exec bash "$(dirname "$0")/gpu-ab.sh"
OUT=${OUT:-/tmp/longattn-gpu-out}
source "$(dirname "$0")/gpu-build-common.sh"
if [ "$MODE" = cudnn-ab ]; then
  gpu_build longattn-bench
  AB_SEQS=${SEQS:-8192,32768}
  for round in $(seq 1 "${ROUNDS:-4}"); do
    "$BUILD/bin/longattn-bench" gpu-kernels --seqs "$AB_SEQS" --dims 128 --backends cudnn > "$OUT/ab_ours_$round.log" 2>&1
    PYTHONUNBUFFERED=1 python3 "$SRC/bench/peers/torch_sdpa.py" --seqs "$AB_SEQS" --dims 128 > "$OUT/ab_torch_$round.log" 2>&1
  done
  python3 - "$OUT" <<'PY' | tee "$OUT/table_cudnn_ab.md"
import glob, json, statistics, sys
def runs(pattern, backend):
    out = {}
    for path in sorted(glob.glob(f"{sys.argv[1]}/{pattern}")):
        for line in open(path, errors="replace"):
            if line.startswith("RESULT "):
                for r in json.loads(line[7:])["attention"]:
                    if r["backend"] == backend:
                        for p in ("fwd", "bwd"):
                            out.setdefault((r["seq"], r["causal"], p), []).append(r[f"{p}_tflops"])
    return out
ours, torch = runs("ab_ours_*.log", "cudnn"), runs("ab_torch_*.log", "cudnn")
print("cudnn backend vs PyTorch cuDNN path, alternating runs, d128 bf16 32 heads: TFLOP/s median [min-max]")
print("| seq | causal | pass | ours | torch cudnn | ratio of medians |")
print("|---|---|---|---|---|---|")
for key in sorted(ours):
    a, b = ours[key], torch.get(key, [])
    if not b:
        continue
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"| {key[0] // 1024}k | {'yes' if key[1] else 'no'} | {key[2]} | {ma:.0f} [{min(a):.0f}-{max(a):.0f}] | "
          f"{mb:.0f} [{min(b):.0f}-{max(b):.0f}] | {ma / mb:.3f} |")
PY
  exit 0
fi

gpu_build test_gpu longattn-bench ring_attention
[ "$MODE" = build ] && exit 0

if [ "$MODE" = wgmma ]; then
  # The wgmma forward's tests, then the wgmma backward's in a process of its own: a fault there
  # must not take the forward's results with it.
  timeout 180 "$BUILD/bin/test_gpu" --gtest_brief=1 --gtest_filter='*WgmmaTile*:*cuda_wgmma*:GpuBackend.Unknown*-*cuda_wgmma_bwd*' \
    > "$OUT/test_gpu_wgmma.log" 2>&1
  wgmma_rc=$?
  grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|Failure|differs|error" "$OUT/test_gpu_wgmma.log" | head -30
  timeout 180 "$BUILD/bin/test_gpu" --gtest_brief=1 --gtest_filter='*WgmmaBwdTile*:*cuda_wgmma_bwd*' > "$OUT/test_gpu_wgmma_bwd.log" 2>&1
  wgmma_bwd_rc=$?
  grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|Failure|differs|error" "$OUT/test_gpu_wgmma_bwd.log" | head -30
  # mma.sync, then the wgmma kernels with each warpgroup schedule of the forward.
  for k in mma wgmma-pipeline wgmma-overlap; do
    schedule=overlap; [ "$k" != mma ] && schedule=${k#wgmma-}
    LONGATTN_CUDA_FWD_KERNEL=${k%%-*} LONGATTN_CUDA_BWD_KERNEL=${k%%-*} LONGATTN_CUDA_WGMMA_FWD_SCHEDULE=$schedule \
      timeout 180 "$BUILD/bin/longattn-bench" gpu-kernels --seqs 8192,32768 --dims 128 --backends cuda > "$OUT/bench_$k.log" 2>&1
  done
  # PyTorch's flash and cuDNN backends on the same shapes in the same call (the own kernels' peers).
  PYTHONUNBUFFERED=1 timeout 150 python3 "$SRC/bench/peers/torch_sdpa.py" --seqs 8192,32768 --dims 128 \
    > "$OUT/bench_torch_sdpa.log" 2>&1
  python3 - "$OUT" <<'PY' | tee "$OUT/table_wgmma.md"
import json, sys
def rows(path, backend=None):
    try:
        for line in open(path, errors="replace"):
            if line.startswith("RESULT "):
                return {(r["seq"], r["causal"]): (r.get("fwd_tflops"), r.get("bwd_tflops")) for r in json.loads(line[7:])["attention"]
                        if backend is None or (r["backend"] == backend and r["d"] == 128)}
    except OSError:
        pass
    return {}
kinds = ["mma", "wgmma-pipeline", "wgmma-overlap"]
ours = {k: rows(f"{sys.argv[1]}/bench_{k}.log") for k in kinds}
torch = sys.argv[1] + "/bench_torch_sdpa.log"
peers = {"torch flash": rows(torch, "flash"), "torch cudnn": rows(torch, "cudnn")}
print("TFLOP/s forward / backward, d128 bf16 32 heads: own mma.sync, own wgmma (forward schedule: pipeline,")
print("overlap; backward the same wgmma kernel) vs PyTorch flash / cuDNN")
print("| seq | causal | " + " | ".join(kinds) + " | torch flash | torch cudnn |")
print("|---|---|" + "---|" * (len(kinds) + 2))
def f(pair):
    g = lambda x: f"{x:.0f}" if x else "-"
    return f"{g(pair[0])} / {g(pair[1])}" if pair else "-"
for key in sorted(set().union(*[set(v) for v in ours.values()])):
    cells = [f(ours[k].get(key)) for k in kinds] + [f(v.get(key)) for v in peers.values()]
    print(f"| {key[0] // 1024}k | {'yes' if key[1] else 'no'} | " + " | ".join(cells) + " |")
PY
  echo "test_gpu (cuda_wgmma forward) exit code: $wgmma_rc; (cuda_wgmma_bwd) exit code: $wgmma_bwd_rc"
  exit $(( wgmma_rc || wgmma_bwd_rc ))
fi

"$BUILD/bin/test_gpu" --gtest_brief=1 --gtest_filter='-*cuda_wgmma*:*WgmmaTile*:*WgmmaBwdTile*' > "$OUT/test_gpu.log" 2>&1
test_rc=$?
grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|Failure|differs|error" "$OUT/test_gpu.log" | head -40
echo "test_gpu exit code: $test_rc"
# The wgmma kernels' cases in a process of their own, under a time limit: a fault there must
# not poison the CUDA context of the other tests, nor a hang eat the device time.
timeout 240 "$BUILD/bin/test_gpu" --gtest_brief=1 --gtest_filter='*WgmmaTile*:*WgmmaBwdTile*:*cuda_wgmma*' > "$OUT/test_gpu_wgmma.log" 2>&1
wgmma_rc=$?
grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|Failure|differs|error" "$OUT/test_gpu_wgmma.log" | head -20
echo "test_gpu (cuda_wgmma) exit code: $wgmma_rc"
test_rc=$(( test_rc || wgmma_rc ))
# The distributed job end to end on this one GPU (NCCL ring of one rank).
# Both the auto backend (cuDNN here) and the own kernels (on Hopper: the wgmma forward and backward).
if [ -x "$BUILD/bin/ring_attention" ]; then
  for backend in auto cuda; do
    mpirun --allow-run-as-root -np 1 "$BUILD/bin/ring_attention" --device cuda --backend $backend --seq-len 4096 --heads 8 \
      --kv-heads 2 --head-dim 128 --causal --backward --check > "$OUT/ring_attention_$backend.log" 2>&1
    ring_rc=$?
    echo "ring_attention --device cuda --backend $backend (1 rank) exit code: $ring_rc"
    grep -E "RESULT|error|check" "$OUT/ring_attention_$backend.log" | tail -3 | cut -c1-400
    test_rc=$(( test_rc || ring_rc ))
  done
fi
[ "$MODE" = test ] && exit $test_rc

SEQS=8192,32768,131072
[ "$MODE" = quick ] && SEQS=8192,32768
# Column "ours cuda mma": the mma.sync kernels (every shape); the wgmma kernels get their own column.
LONGATTN_CUDA_FWD_KERNEL=mma LONGATTN_CUDA_BWD_KERNEL=mma "$BUILD/bin/longattn-bench" gpu-kernels --seqs $SEQS > "$OUT/bench_gpu_kernels.log" 2>&1
# The Hopper wgmma kernels (head dim 128; the default on Hopper) in their own column.
LONGATTN_CUDA_FWD_KERNEL=wgmma LONGATTN_CUDA_BWD_KERNEL=wgmma timeout 300 "$BUILD/bin/longattn-bench" gpu-kernels --seqs $SEQS --dims 128 --backends cuda \
  > "$OUT/bench_gpu_kernels_wgmma.log" 2>&1
PYTHONUNBUFFERED=1 python3 "$SRC/bench/peers/torch_sdpa.py" --seqs $SEQS > "$OUT/bench_torch_sdpa.log" 2>&1

python3 - "$OUT/bench_gpu_kernels.log" "$OUT/bench_torch_sdpa.log" "$OUT/bench_gpu_kernels_wgmma.log" <<'PY' | tee "$OUT/table.md"
import json, sys
def result(path):
    for line in open(path, errors="replace"):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"attention": [], "decode": []}
ours, torch, wgmma = result(sys.argv[1]), result(sys.argv[2]), result(sys.argv[3])
cols = [("ours cuda mma", ours, "cuda"), ("ours cuda wgmma", wgmma, "cuda"), ("ours cudnn", ours, "cudnn"),
        ("torch flash", torch, "flash"), ("torch cudnn", torch, "cudnn")]
def cell(res, be, seq, d, causal, key):
    for r in res["attention"]:
        if r["backend"] == be and r["seq"] == seq and r["d"] == d and r["causal"] == causal and r.get(key):
            return f"{r[key]:.0f}"
    return "-"
shapes = sorted({(r["seq"], r["d"], r["causal"]) for res in (ours, torch) for r in res["attention"]}, key=lambda s: (s[1], s[0], not s[2]))
print("TFLOP/s fwd / bwd (bf16, 32 heads, batch 1)")
print("| seq | d | causal | " + " | ".join(c[0] for c in cols) + " |")
print("|---|---|---|" + "---|" * len(cols))
for seq, d, causal in shapes:
    cells = [cell(res, be, seq, d, causal, "fwd_tflops") + " / " + cell(res, be, seq, d, causal, "bwd_tflops") for _, res, be in cols]
    print(f"| {seq // 1024}k | {d} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
print(f"decode 1M-token KV (GB/s of KV; device copy {ours.get('copy_gbs', 0):.0f} GB/s):",
      ", ".join(f"ours {r['backend']} {r['gbs']:.0f}" for r in ours["decode"] if r.get("gbs")),
      "|", ", ".join(f"torch {r['backend']} {r['gbs']:.0f}" for r in torch["decode"] if r.get("gbs")))
PY
exit $test_rc

#!/usr/bin/env bash
# scripts/gpu-run.sh ab: the own forward kernels of this tree against those of git revision
# BASE_REV (default 938fb34) on one GPU. Both trees are built side by side (longattn-bench, and
# test_gpu for this tree; no cuDNN), this tree's GPU forward tests run, then
# `longattn-bench gpu-kernels --backends cuda` times each forward kernel (mma.sync at head dims
# AB_DIMS; wgmma at 128 with each warpgroup schedule) in both builds, alternating which goes first,
# ROUNDS times (default 3), so drift of the GPU over the run falls on both sides; no round starts
# that would end past AB_DEADLINE_S (default 480) seconds after the start, so that one call stays
# under the device's 10-minute limit whatever the builds cost. Last: a before/after table of
# medians [min-max].
# Logs in $OUT: device.txt, build_base.log, build_current.log, ab_tests.log, ab_bench.log,
# table_ab.md. Without git history it reads the base tree from build-ab-base/BASE_REV.tar
# (`scripts/gpu-run.sh pack-base` makes it where the repository is; carry build-ab-base).
set -uo pipefail
BASE_REV=${BASE_REV:-938fb34}
AB_SEQS=${AB_SEQS:-8192,32768}
AB_DIMS=${AB_DIMS:-64,128}
OUT=${OUT:-/tmp/longattn-gpu-out}
source "$(dirname "$0")/gpu-build-common.sh"

BASE_SRC=/tmp/longattn-base-src-$BASE_REV
if [ ! -f "$BASE_SRC/.extracted" ]; then  # kept across calls on a warm machine: no rebuild from new mtimes
  rm -rf "$BASE_SRC" && mkdir -p "$BASE_SRC"
  if git -C "$SRC" cat-file -e "$BASE_REV^{commit}" 2>/dev/null; then
    git -C "$SRC" archive "$BASE_REV" | tar -x -C "$BASE_SRC" || exit 1
  elif [ -f "$SRC/build-ab-base/$BASE_REV.tar" ]; then
    tar -xf "$SRC/build-ab-base/$BASE_REV.tar" -C "$BASE_SRC" || exit 1
  else
    echo "error: revision $BASE_REV is neither in git history here nor in build-ab-base/$BASE_REV.tar;" \
      "run 'scripts/gpu-run.sh pack-base' (BASE_REV=$BASE_REV) in the repository and carry build-ab-base"
    exit 2
  fi
  touch "$BASE_SRC/.extracted"
fi

BASE_BUILD=$SRC/build-gpu-ab-base
CURRENT_BUILD=$SRC/build-gpu-ab-current
gpu_build_tree "$BASE_SRC" "$BASE_BUILD" "$OUT/build_base.log" longattn-bench &
base_pid=$!
gpu_build_tree "$SRC" "$CURRENT_BUILD" "$OUT/build_current.log" longattn-bench test_gpu
current_rc=$?
wait $base_pid
base_rc=$?
for log in build_base build_current; do grep -E "error" "$OUT/$log.log" | head -20; done
[ $base_rc -eq 0 ] && [ $current_rc -eq 0 ] || { echo "build failed (base $base_rc, current $current_rc)"; exit 1; }

# This tree's forward kernels against the CPU reference (the wgmma backward's cases stay out: a
# fault there must not take the forward's results with it; its kernel is the same in both trees).
timeout 180 "$CURRENT_BUILD/bin/test_gpu" --gtest_brief=1 \
  --gtest_filter='*GpuVsReference*/cuda*:*WgmmaTile*:GpuBackend.Unknown*-*cuda_wgmma_bwd*:*WgmmaBwdTile*' > "$OUT/ab_tests.log" 2>&1
test_rc=$?
grep -E "^\[ +(PASSED|FAILED|SKIPPED) +\]|Failure|differs|error" "$OUT/ab_tests.log" | head -30
echo "test_gpu (forward kernels, this tree) exit code: $test_rc"

: > "$OUT/ab_bench.log"
bench() {  # bench TREE KERNEL_CONFIG ROUND
  local bin=$BASE_BUILD/bin/longattn-bench kernel=${2%%-*} schedule=overlap dims=$AB_DIMS
  [ "$1" = current ] && bin=$CURRENT_BUILD/bin/longattn-bench
  [ "$2" = wgmma-pipeline ] && schedule=pipeline
  [ "$kernel" = wgmma ] && dims=128
  echo "=== $1 $2 round $3" >> "$OUT/ab_bench.log"
  LONGATTN_CUDA_FWD_KERNEL=$kernel LONGATTN_CUDA_WGMMA_FWD_SCHEDULE=$schedule timeout 90 "$bin" gpu-kernels \
    --seqs "$AB_SEQS" --dims "$dims" --backends cuda --decode-kv 65536 >> "$OUT/ab_bench.log" 2>&1
}
for round in $(seq 1 "${ROUNDS:-3}"); do
  round_start=$SECONDS
  order="base current"
  [ $((round % 2)) -eq 0 ] && order="current base"
  for tree in $order; do
    for config in mma wgmma-overlap wgmma-pipeline; do bench "$tree" "$config" "$round"; done
  done
  echo "bench round $round: $((SECONDS - round_start)) s, $SECONDS s since the start"
  if [ $((SECONDS + SECONDS - round_start)) -gt "${AB_DEADLINE_S:-480}" ]; then
    echo "no time for another round before AB_DEADLINE_S=${AB_DEADLINE_S:-480}"
    break
  fi
done

python3 - "$OUT/ab_bench.log" "$BASE_REV" <<'PY' | tee "$OUT/table_ab.md"
import json, statistics, sys
runs = {}  # (tree, config, seq, d, causal) -> {"fwd": [...], "bwd": [...]}
tree = config = None
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("=== "):
        tree, config = line.split()[1:3]
    elif line.startswith("RESULT ") and tree:
        for r in json.loads(line[7:])["attention"]:
            cell = runs.setdefault((tree, config, r["seq"], r["d"], r["causal"]), {"fwd": [], "bwd": []})
            for p in ("fwd", "bwd"):
                if r.get(f"{p}_tflops"):
                    cell[p].append(r[f"{p}_tflops"])
def stat(xs):
    return f"{statistics.median(xs):.0f} [{min(xs):.0f}-{max(xs):.0f}]" if xs else "-"
def ratio(a, b):
    return f"{statistics.median(b) / statistics.median(a):.3f}" if a and b else "-"
print(f"Own kernels, base {sys.argv[2]} vs this tree, alternating runs: TFLOP/s median [min-max] (bf16, 32 heads, batch 1)")
print("| forward kernel | seq | d | causal | fwd base | fwd now | now/base | bwd base | bwd now |")
print("|---|---|---|---|---|---|---|---|---|")
for key in sorted({k[1:] for k in runs}):
    base, now = runs.get(("base",) + key, {"fwd": [], "bwd": []}), runs.get(("current",) + key, {"fwd": [], "bwd": []})
    config, seq, d, causal = key
    print(f"| {config} | {seq // 1024}k | {d} | {'yes' if causal else 'no'} | {stat(base['fwd'])} | {stat(now['fwd'])} | "
          f"{ratio(base['fwd'], now['fwd'])} | {stat(base['bwd'])} | {stat(now['bwd'])} |")
PY
exit $test_rc

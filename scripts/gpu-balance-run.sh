#!/usr/bin/env bash
# Issue 14's one-GPU measurement of the variable-length plans: build longattn-bench, calibrate the
# cost model's kernel-rate table on this GPU (`calibrate` -> a machine file), then run
# `balance-measure` with that file on the three shipped batches at P = 8 and 16 (8 GPUs per node),
# forward and backward timed apart, each rank's local launches one rank after another. Every step has a
# time limit so the whole run stays within 6 minutes; logs and RESULT lines under $OUT; a short
# markdown table is printed last.
#   scripts/gpu-balance-run.sh          on a GPU machine (nvidia-h100-x1), CUDA build in $BUILD (build-gpu)
#   scripts/gpu-balance-run.sh --cpu    the same steps on the CPU at tiny sizes (build in $BUILD, default
#                                       build-balance-cpu), to check the script where no GPU is
set -uo pipefail
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-/tmp/longattn-balance-out}
mkdir -p "$OUT"
SRC=$(cd "$(dirname "$0")/.." && pwd)
cd "$SRC"

if [ "$MODE" = gpu ]; then
  source "$SRC/scripts/gpu-build-common.sh"
  gpu_build longattn-bench
  # 262144 tokens per batch keep one rank's tensors far under the GPU's memory and all 36 plan
  # measurements within a few minutes; the batch is cut, not scaled (balance-measure --help).
  DEVICE=(--device cuda)
  CALIBRATE=(--tokens 131072)
  # --budget-s starts no batch x P after 130 s, so a slow device still ends inside the limit with
  # a RESULT line (the rest reported skipped).
  MEASURE=(--total-tokens 262144 --heads 32 --kv-heads 8 --head-dim 128 --warmups 1 --reps 2 --budget-s 130)
  BASE_MACHINE=h100
  CALIBRATE_LIMIT=60
  MEASURE_LIMIT=210
else
  BUILD=${BUILD:-$SRC/build-balance-cpu}
  [ -f "$BUILD/CMakeCache.txt" ] || cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLONGATTN_CUDA=OFF > "$OUT/configure.log" 2>&1 ||
    { tail -20 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"${JOBS:-2}" --target longattn-bench > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
  DEVICE=(--device cpu)
  CALIBRATE=(--lengths 16,32,64,128 --tokens 256 --heads 2 --kv-heads 1 --head-dim 16 --reps 1 --warmups 1)
  MEASURE=(--total-tokens 1024 --heads 2 --kv-heads 1 --head-dim 16 --warmups 0 --reps 1)
  BASE_MACHINE=cpu
  CALIBRATE_LIMIT=120
  MEASURE_LIMIT=300
fi
BENCH="$BUILD/bin/longattn-bench"
status=0

# The rate table of this device; the measured runs plan and predict with it.
MACHINE_FILE="$OUT/machine-calibrated.txt"
timeout "$CALIBRATE_LIMIT" "$BENCH" calibrate "${DEVICE[@]}" "${CALIBRATE[@]}" --out "$MACHINE_FILE" > "$OUT/calibrate.log" 2>&1
rc=$?
sed -n '/^mask/,/^machine file/p' "$OUT/calibrate.log"
if [ $rc != 0 ]; then
  echo "calibrate: exit $rc (see calibrate.log); the measured runs use the built-in $BASE_MACHINE machine"
  status=1
  MACHINE_ARGS=(--machine "$BASE_MACHINE")
else
  MACHINE_ARGS=(--machine "$BASE_MACHINE" --machine-file "$MACHINE_FILE")
fi

# One run measures forward and backward separately, so it reports both.
FILES="bench/data/lognormal_long_tail.txt,bench/data/bimodal_mix.txt,bench/data/giant_and_short.txt"
timeout "$MEASURE_LIMIT" "$BENCH" balance-measure "${DEVICE[@]}" "${MEASURE[@]}" "${MACHINE_ARGS[@]}" --backward \
  --lengths-file "$FILES" --ranks 8,16 --gpus-per-node 8 > "$OUT/balance-measure.log" 2>&1
rc=$?
echo "balance-measure: exit $rc (log: balance-measure.log)"
[ $rc = 0 ] || { status=1; tail -5 "$OUT/balance-measure.log"; }

# The table, from the RESULT line.
python3 - "$OUT/balance-measure.log" <<'PY'
import json, os, sys
result = [l for l in open(sys.argv[1]) if l.startswith("RESULT ")]
if not result:
    sys.exit("no RESULT line: the per-P tables in the log are what finished")
r = json.loads(result[-1][len("RESULT "):])
print(f"device {r['device']}, backend {r['backend']}, {r['dtype']}, timing by {r['timing']}, model {r['machine']}, "
      f"batches cut to {r['total_tokens']} tokens, {r['q_heads']}/{r['kv_heads']} heads, d {r['head_dim']}")
print(f"worst hierarchical measured compute max/mean (fwd+bwd): {r['worst_hierarchical_imbalance']:.4f} (target <= {r['target_imbalance']})")
print()
print("| batch | P | hier fwd max/mean | hier fwd+bwd max/mean | model max/mean | hier max ms | model max ms | "
      "hier step max/mean (modelled, measured*) | hier step ms* | zigzag step ms* | whole step ms* | zigzag max/mean | whole max/mean |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for run in r["runs"]:
    if run.get("skipped"):
        print(f"| {os.path.basename(run['lengths_file']).replace('.txt', '')} | {run['ranks']} | skipped (--budget-s) |")
        continue
    plans = run["plans"]
    def cell(name, key, digits=3):
        p = plans.get(name)
        return "-" if not p or p.get(key) is None else f"{p[key]:.{digits}f}"
    row = [os.path.basename(run["lengths_file"]).replace(".txt", ""), str(run["ranks"]),
           cell("hierarchical", "forward_imbalance", 4), cell("hierarchical", "measured_imbalance", 4),
           cell("hierarchical", "model_imbalance", 4), cell("hierarchical", "measured_max_ms"), cell("hierarchical", "model_max_ms"),
           cell("hierarchical", "modelled_imbalance", 4) + ", " + cell("hierarchical", "measured_step_imbalance", 4),
           cell("hierarchical", "measured_step_ms", 2), cell("per-sequence-zigzag", "measured_step_ms", 2),
           cell("whole-sequences", "measured_step_ms", 2), cell("per-sequence-zigzag", "measured_imbalance", 4),
           cell("whole-sequences", "measured_imbalance", 4)]
    print("| " + " | ".join(row) + " |")
print("* the modelled step (one layer fwd+bwd, linear layers, exposed communication) with the measured compute in place of the modelled")
PY
exit $status

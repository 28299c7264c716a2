#!/usr/bin/env bash
# Issue 15's "a context one GPU cannot hold", in one call on a machine with 2 GPUs or more
# (nvidia-h100-x2 / nvidia-h200-x2): examples/torch_train.py under torchrun with --device cuda.
#   1. build the library and liblongattn_c.so (as gpu-session.sh does);
#   2. two short sequences on one GPU (the first with the SDPA reference: losses agree in bf16), whose
#      peak memories give a fixed part and a per-token slope;
#   3. the sequence length whose per-rank memory with all the machine's GPUs is about 80% of a card:
#      on one GPU it must end with torch_train's one-line out-of-memory error, on all GPUs it must
#      train (losses fall, peak memory per rank, tokens/s);
# and prints a short table last. Logs under $OUT.   Usage: scripts/gpu-torchrun-run.sh
# Environment: OUT, BUILD, JOBS, SKIP_BUILD=1, MODEL (torch_train's model flags), STEPS (default 3).
set -uo pipefail
source "$(dirname "$0")/gpu-build-common.sh"
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
MODEL=${MODEL:---dim 2048 --heads 16 --kv-heads 4 --layers 4 --vocab 32000}
STEPS=${STEPS:-3}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  gpu_build longattn
  { cmake --install "$BUILD" --prefix "$BUILD/prefix" && cmake -S "$SRC/python" -B "$BUILD/python" -DCMAKE_BUILD_TYPE=Release \
      -DLONGATTN_CUDA=ON -DLONGATTN_LIBRARY_PREFIX="$BUILD/prefix" && cmake --build "$BUILD/python" -j"$JOBS"; } > "$OUT/build_python.log" 2>&1 \
    || { echo "python library build failed"; tail -20 "$OUT/build_python.log"; exit 1; }
fi
export PYTHONPATH="$SRC/python" LONGATTN_C_LIBRARY="$(find "$BUILD/python" -name liblongattn_c.so | head -1)"
train() {  # train NAME NPROC FLAGS...: RESULT line kept in $OUT/NAME.result, exit code returned
  local name=$1 nproc=$2; shift 2
  timeout "${LIMIT:-240}" python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
    "$SRC/examples/torch_train.py" --device cuda --steps "$STEPS" $MODEL "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep "^RESULT" "$OUT/$name.log" | tail -1 | cut -c8- > "$OUT/$name.result"
  echo "$name ($nproc GPU, $*): exit $rc"; grep -E "torch_train:|median step|largest relative" "$OUT/$name.log" | head -3
  return $rc
}
train short_1gpu 1 --seq-len 8192
train shorter_1gpu 1 --seq-len 4096 --no-reference
# Memory from the two short runs: a fixed part (weights, gradients, AdamW state) and a per-token
# slope; the learned position table (16 bytes per token per model dim with its gradient and AdamW
# state) is in the slope but every rank holds all of it, the rest of the slope is split over ranks.
# The long length is the largest whose per-rank need with all GPUs is 80% of a card.
SEQ=$(python3 - "$OUT/shorter_1gpu.result" "$OUT/short_1gpu.result" "$MODEL" <<'PY'
import json, sys, torch
a, b = (json.load(open(p)) for p in sys.argv[1:3])
dim = int(sys.argv[3].split("--dim")[1].split()[0]) if "--dim" in sys.argv[3] else 64
card = torch.cuda.get_device_properties(0).total_memory / 2**30
gpus = torch.cuda.device_count()
slope = (b["peak_gib_per_rank"][0] - a["peak_gib_per_rank"][0]) / (b["seq_len"] - a["seq_len"])
fixed = a["peak_gib_per_rank"][0] - slope * a["seq_len"]
table = 16 * dim / 2**30
per_rank = lambda t, n: fixed + table * t + (slope - table) * t / n
step = 4096 * gpus
seq = step
while per_rank(seq + step, gpus) <= 0.8 * card:
    seq += step
print(seq)
print(f"memory model: fixed {fixed:.2f} GiB, {slope * 2**20:.1f} KiB/token on one GPU; {seq} tokens need "
      f"{per_rank(seq, 1):.0f} GiB on one GPU and {per_rank(seq, gpus):.0f} GiB per rank on {gpus} "
      f"(card {card:.0f} GiB)", file=sys.stderr)
PY
)
echo "long sequence: $SEQ tokens ($GPUS GPUs)"
LIMIT=300 train long_1gpu 1 --seq-len "$SEQ" --no-reference; one=$?
LIMIT=300 train "long_${GPUS}gpu" "$GPUS" --seq-len "$SEQ" --no-reference; all=$?
echo
echo "| run | GPUs | tokens | exit | step ms | tokens/s | peak GiB per rank | losses |"
echo "|---|---|---|---|---|---|---|---|"
for name in short_1gpu shorter_1gpu long_1gpu "long_${GPUS}gpu"; do
  python3 - "$name" "$OUT/$name.result" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    r = json.loads(open(path).read())
except Exception:
    print(f"| {name} | | | no RESULT | | | | |"); sys.exit()
fmt = lambda key, f: (f.format(r[key]) if key in r else "")
print(f"| {name} | {r.get('ranks')} | {r.get('seq_len')} | {'ok' if r.get('ok') else r.get('error', 'failed')} | "
      f"{fmt('step_ms', '{:.0f}')} | {fmt('tokens_per_second', '{:.0f}')} | {r.get('peak_gib_per_rank', '')} | "
      f"{[round(x, 4) for x in r.get('losses', [])]} |")
PY
done
echo "expected: long_1gpu ends with out of memory (exit 3), long_${GPUS}gpu ok: one=$one all=$all"

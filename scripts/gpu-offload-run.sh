#!/usr/bin/env bash
# Attention offloading on one GPU host (nvidia-h100-x1: 16 cores, one H100), in one call:
#   1. build longattn-bench, longattn-offload-server and offload_decode into build-gpu;
#   2. longattn-bench decode with 16 and 8 threads: the CPU decode kernel's KV GB/s next to the
#      host's DRAM read rate (the target is dram_ratio >= 0.8 with all 16 cores);
#   3. two longattn-offload-server daemons on loopback, then offload_decode with the model on the
#      GPU: a small --check pass of both modes, then the timed runs, attention offloaded to the
#      servers vs the same model all on the GPU (tokens/s, attention ms/step, GPU memory, KV bytes
#      the servers hold = GPU memory freed);
# and prints a short markdown table last. Logs under $OUT (default /tmp/longattn-offload-out).
#
#   scripts/gpu-offload-run.sh                       # on the GPU machine, from the repository root
#   SMALL=1 DEVICE=cpu BUILD=build JOBS=2 scripts/gpu-offload-run.sh   # tiny sizes, no GPU needed
#
# Environment: OUT, BUILD (build folder, default build-gpu), JOBS (build jobs, default all cores),
# SMALL=1 (tiny sizes), DEVICE=cuda|cpu (cpu: the model on the CPU, offloaded mode only),
# SKIP_BUILD=1, SERVER_THREADS (decode threads per server, default (cores - 2) / 2).
set -uo pipefail
OUT=${OUT:-/tmp/longattn-offload-out}
BUILD=${BUILD:-$(pwd)/build-gpu}
SMALL=${SMALL:-0}
DEVICE=${DEVICE:-cuda}
NPROC=$(nproc)
JOBS=${JOBS:-$NPROC}
SERVER_THREADS=${SERVER_THREADS:-$(( NPROC > 3 ? (NPROC - 2) / 2 : 1 ))}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
BIN="$BUILD/bin"
status=0

# Sizes. The model: 8 layers, batch 8, 32k context, 32/8 heads x 128, bf16: 8.6 GB of KV.
if [ "$SMALL" = 1 ]; then
  BENCH_ARGS="--batch 2 --context 4096 --reps 3"; BENCH_THREADS="2 1"
  MODEL="--layers 2 --batch 2 --context 2048 --steps 4 --heads 8 --kv-heads 2 --head-dim 64 --dtype bf16"
  CHECK_MODEL="--layers 2 --batch 2 --context 500 --steps 3 --heads 8 --kv-heads 2 --head-dim 64 --dtype bf16"
  MEMORY_LIMIT=1G
else
  BENCH_ARGS="--batch 8 --context 65536 --reps 10"; BENCH_THREADS="16 8"   # 4 GiB of KV
  MODEL="--layers 8 --batch 8 --context 32768 --steps 32 --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16"
  # Past 4096 keys the cuda backend uses its split-KV decode kernel: check that path too.
  CHECK_MODEL="--layers 2 --batch 3 --context 5000 --steps 3 --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16"
  MEMORY_LIMIT=24G
fi

{ date -u; echo "cores $NPROC"; free -g | head -2; } > "$OUT/host.txt"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/host.txt" 2>&1
fi
cat "$OUT/host.txt"

# ---- 1. build ----
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cuda_flag="-DLONGATTN_CUDA=ON -DLONGATTN_CUDA_ARCHS=90a"
  [ "$DEVICE" = cuda ] || cuda_flag=""
  echo "building into $BUILD (-j$JOBS) ..."
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release $cuda_flag > "$OUT/configure.log" 2>&1 \
    || { tail -20 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$JOBS" --target longattn-bench longattn-offload-server offload_decode > "$OUT/build.log" 2>&1 \
    || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
fi
for b in longattn-bench longattn-offload-server offload_decode; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b"; exit 1; }
done

# ---- 2. the CPU decode kernel against DRAM ----
for t in $BENCH_THREADS; do
  echo "longattn-bench decode --threads $t $BENCH_ARGS"
  OMP_PROC_BIND=spread OMP_PLACES=cores "$BIN/longattn-bench" decode --threads "$t" $BENCH_ARGS > "$OUT/bench_decode_t$t.log" 2>&1 || status=1
  grep -v RESULT "$OUT/bench_decode_t$t.log" | tail -5
done

# ---- 3. servers on loopback ----
secrets=$(mktemp -d)
server_pids=()
cleanup() {
  for p in "${server_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${server_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null
  done
  server_pids=()
  rm -rf "$secrets"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secrets/token")

addrs=()
for i in 0 1; do
  "$BIN/longattn-offload-server" --listen 127.0.0.1:0 --token-file "$secrets/token" --threads "$SERVER_THREADS" \
    --memory-limit "$MEMORY_LIMIT" > "$OUT/server$i.out" 2> "$OUT/server$i.log" &
  server_pids+=($!)
done
for i in 0 1; do
  port=""
  for _ in $(seq 100); do
    port=$(awk '/^LISTENING/ {print $2}' "$OUT/server$i.out" 2>/dev/null)
    [ -n "$port" ] && break
    kill -0 "${server_pids[$i]}" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "server $i did not start:"; tail -5 "$OUT/server$i.log"; exit 1; }
  addrs+=("127.0.0.1:$port")
done
SERVERS=$(IFS=,; echo "${addrs[*]}")
echo "servers: $SERVERS ($SERVER_THREADS decode threads each, memory limit $MEMORY_LIMIT)"
OFFLOAD="--servers $SERVERS --token-file $secrets/token --timeout-ms 120000"

run_decode() {  # name, args...: runs offload_decode, keeps its log, shows its summary
  local name=$1; shift
  echo "offload_decode $*" > "$OUT/$name.log"
  "$BIN/offload_decode" "$@" >> "$OUT/$name.log" 2>&1 || { status=1; echo "$name FAILED:"; tail -3 "$OUT/$name.log"; }
  grep -v RESULT "$OUT/$name.log" | tail -n +2 | sed "s/^/[$name] /"
}

# Correctness first (small, every attention compared with the CPU backend), then the timed runs.
run_decode check_offloaded --device "$DEVICE" $OFFLOAD $CHECK_MODEL --check
[ "$DEVICE" = cuda ] && run_decode check_local --device cuda --local-attention $CHECK_MODEL --check
run_decode offloaded --device "$DEVICE" $OFFLOAD $MODEL
[ "$DEVICE" = cuda ] && run_decode local --device cuda --local-attention $MODEL

cleanup
for i in 0 1; do grep RESULT "$OUT/server$i.out" | sed "s/^/[server$i] /" | cut -c1-300; done

# ---- the table ----
python3 - "$OUT" "$BENCH_THREADS" <<'PY' | tee "$OUT/summary.md"
import json, os, sys
out, threads = sys.argv[1], sys.argv[2].split()
def result(name):
    try:
        for line in open(os.path.join(out, name)):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    except (OSError, ValueError):
        pass
    return None
def f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)
gib = 2.0 ** 30
print()
print("| CPU decode kernel (longattn-bench decode) | threads | KV GiB | kernel KV GB/s | DRAM read GB/s | dram_ratio |")
print("|---|---|---|---|---|---|")
for t in threads:
    r = result(f"bench_decode_t{t}.log") or {}
    print(f"| {'target >= 0.8' if t == threads[0] else ''} | {t} | {f(r.get('kv_bytes', 0) / gib if r else None)} | "
          f"{f(r.get('kv_gbps'))} | {f(r.get('dram_read_gbps'))} | {f(r.get('dram_ratio'), '{:.3f}')} |")
off, loc = result("offloaded.log"), result("local.log")
co, cl = result("check_offloaded.log"), result("check_local.log")
if off or loc:
    m = off or loc
    print()
    print(f"offload_decode: {m['layers']} layers, batch {m['batch']}, context {m['context']} + {m['steps']} steps, "
          f"{m['heads']}/{m['kv_heads']} heads x {m['head_dim']}, {m['dtype']}, model on {m.get('device', 'cpu')}")
    print()
    print("| | attention offloaded (2 servers, this host) | all on the GPU |")
    print("|---|---|---|")
    g = lambda r, k, s=1.0, fmt="{:.2f}": f(None if not r or r.get(k) is None else r[k] / s, fmt)
    print(f"| tokens/s | {g(off, 'tokens_per_s', fmt='{:.1f}')} | {g(loc, 'tokens_per_s', fmt='{:.1f}')} |")
    print(f"| attention ms/step (all layers) | {g(off, 'attention_ms_per_step')} | {g(loc, 'attention_ms_per_step')} |")
    print(f"| GPU memory used, GiB | {g(off, 'gpu_memory_used_bytes', gib)} | {g(loc, 'gpu_memory_used_bytes', gib)} |")
    print(f"| KV in GPU memory, GiB | {g(off, 'kv_bytes_gpu', gib)} | {g(loc, 'kv_bytes_gpu', gib)} |")
    print(f"| KV held by the servers, GiB | {g(off, 'kv_bytes_servers', gib)} | - |")
    print(f"| prefill s | {g(off, 'prefill_s')} | {g(loc, 'prefill_s')} |")
    print(f"| check: max abs error vs CPU attention | {g(co, 'max_error', fmt='{:.2g}')} | {g(cl, 'max_error', fmt='{:.2g}')} |")
    print(f"| final hidden-state fingerprint (same model: close) | {g(off, 'hidden_fingerprint', fmt='{:.5g}')} | "
          f"{g(loc, 'hidden_fingerprint', fmt='{:.5g}')} |")
    if off and loc and off.get("gpu_memory_used_bytes") is not None:
        freed = (loc["gpu_memory_used_bytes"] - off["gpu_memory_used_bytes"]) / gib
        print(f"\nGPU memory freed by offloading: {freed:.2f} GiB (KV the servers hold: {off['kv_bytes_servers'] / gib:.2f} GiB); "
              f"offloaded decode runs at {off['tokens_per_s'] / loc['tokens_per_s']:.3f}x the all-on-GPU tokens/s.")
PY
echo "status: $status (logs in $OUT)"
exit $status

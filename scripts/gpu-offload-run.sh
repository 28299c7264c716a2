#!/usr/bin/env bash
# Attention offloading on one GPU host (nvidia-h100-x1: 16 cores, one H100), in one call:
#   1. build longattn-bench, longattn-offload-server and offload_decode into $BUILD;
#   2. rulers: the host's CPU decode kernel (longattn-bench decode), the device's copy bandwidth
#      (longattn-bench gpu-kernels), and one server's kernel vs end to end at 32 queries x 32k
#      context, CPU server and GPU server (longattn-bench offload --server-device cpu|cuda);
#   3. two CPU servers on loopback (--cpus split between them): --check passes of offload_decode with
#      1, 2 and 3 micro-batches (and all on the GPU), then the timed runs with 1, 2, 3 micro-batches
#      and all on the GPU;
#   4. a GPU KV server (longattn-offload-server --device cuda): a --check pass, then offload_decode
#      with 1 and 2 micro-batches against it;
#   5. capacity: the largest batch that fits all on the GPU (--find-max-batch), the all-on-GPU mode
#      refused at a batch past it (out of GPU memory), and that batch decoded with the KV offloaded;
#   6. longattn-bench offload-model fed with this run's measured parts, predicting every measured
#      offloaded point, printed beside the measured tokens/s;
# and prints short markdown tables last. Logs under $OUT (default /tmp/longattn-offload-out).
#
#   scripts/gpu-offload-run.sh                                          # on the GPU machine, from the repository root
#   SMALL=1 DEVICE=cpu BUILD=build JOBS=2 scripts/gpu-offload-run.sh    # tiny sizes, no GPU needed (CPU parts only)
#
# Environment: OUT, BUILD (build folder, default build-gpu), JOBS (build jobs, default all cores),
# SMALL=1 (tiny sizes), DEVICE=cuda|cpu (cpu: the model on the CPU; the GPU-only steps are skipped),
# SKIP_BUILD=1, BUDGET_S (the script's whole time; the long capacity run gets what is left of it and is
# skipped under 150 s; default 560, for a 600-second call).
set -uo pipefail
OUT=${OUT:-/tmp/longattn-offload-out}
BUILD=${BUILD:-$(pwd)/build-gpu}
case "$BUILD" in /*) ;; *) BUILD=$(pwd)/$BUILD ;; esac
SMALL=${SMALL:-0}
DEVICE=${DEVICE:-cuda}
NPROC=$(nproc)
JOBS=${JOBS:-$NPROC}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
BIN="$BUILD/bin"
status=0
gpu() { [ "$DEVICE" = cuda ]; }

# Sizes. The model: 8 layers, batch 8, 32k context, 32/8 heads x 128, bf16: 8.6 GB of KV.
if [ "$SMALL" = 1 ]; then
  DECODE_BENCH="--batch 2 --context 4096 --reps 3 --threads $NPROC"
  SERVER_BENCH="--batch 4 --context 2048 --heads 8 --kv-heads 2 --head-dim 64 --reps 3 --no-load --memory-limit 1G"
  GPU_BENCH="--seqs 1024 --dims 64 --backends cuda --reps 2 --causal 0 --decode-kv 65536"
  MODEL="--layers 2 --batch 3 --context 2048 --steps 4 --heads 8 --kv-heads 2 --head-dim 64 --dtype bf16"
  CHECK_MODEL="--layers 2 --batch 3 --context 500 --steps 3 --heads 8 --kv-heads 2 --head-dim 64 --dtype bf16"
  MEMORY_LIMIT=1G; GPU_MEMORY_LIMIT=1G; T=120
else
  DECODE_BENCH="--batch 8 --context 65536 --reps 5 --threads $NPROC"   # 2 GiB of KV
  SERVER_BENCH="--batch 32 --context 32768 --reps 5 --no-load --memory-limit 16G"  # 32 queries x 32k: 4 GiB of KV
  GPU_BENCH="--seqs 4096 --dims 128 --backends cuda --reps 3 --causal 0"
  MODEL="--layers 8 --batch 8 --context 32768 --steps 16 --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16"
  # Past 4096 keys the cuda backend uses its split-KV decode kernel: check that path too.
  CHECK_MODEL="--layers 2 --batch 3 --context 5000 --steps 3 --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16"
  MEMORY_LIMIT=60G; GPU_MEMORY_LIMIT=40G; T=120  # a GPU server doubles a layer's KV buffer as it grows: 32k + steps takes 64k tokens of room
fi
# The capacity run: the model's shape with a batch past what fits all on the GPU, few steps.
CAPACITY_SHAPE=$(echo "$MODEL" | sed -e 's/--steps [0-9]*/--steps 2/')

{ date -u; echo "cores $NPROC"; free -g | head -2; } > "$OUT/host.txt"
gpu && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/host.txt" 2>&1
cat "$OUT/host.txt"

# ---- 1. build ----
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cuda_flag="-DLONGATTN_CUDA=ON -DLONGATTN_CUDA_ARCHS=90a"
  gpu || cuda_flag=""
  echo "building into $BUILD (-j$JOBS) ..."
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release $cuda_flag > "$OUT/configure.log" 2>&1 \
    || { tail -20 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$JOBS" --target longattn-bench longattn-offload-server offload_decode > "$OUT/build.log" 2>&1 \
    || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
fi
for b in longattn-bench longattn-offload-server offload_decode; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b"; exit 1; }
done
echo "built at ${SECONDS}s"

step() {  # name, timeout, command...: runs it, keeps its log, shows its summary lines
  local name=$1 limit=$2; shift 2
  echo "$*" > "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    status=1
    echo "[$name] FAILED (exit $rc$([ $rc = 124 ] && echo ", over ${limit}s")):"; tail -3 "$OUT/$name.log" | sed "s/^/[$name]   /"
  fi
  grep -v RESULT "$OUT/$name.log" | tail -n +2 | tail -8 | sed "s/^/[$name] /"
  return $rc
}

# ---- 2. rulers ----
OMP_PROC_BIND=spread OMP_PLACES=cores step bench_decode $T "$BIN/longattn-bench" decode $DECODE_BENCH
gpu && step bench_gpu_copy $T "$BIN/longattn-bench" gpu-kernels $GPU_BENCH
step bench_server_cpu $T "$BIN/longattn-bench" offload $SERVER_BENCH --threads $(( NPROC > 2 ? NPROC - 2 : 1 ))
gpu && step bench_server_gpu $T "$BIN/longattn-bench" offload $SERVER_BENCH --server-device cuda

# ---- 3. servers on loopback ----
secrets=$(mktemp -d)
server_pids=()
stop_servers() {
  server_pids+=($(cat "$OUT"/*.pid 2>/dev/null))
  for p in "${server_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${server_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null
  done
  server_pids=()
}
trap 'stop_servers; rm -rf "$secrets"' EXIT
trap 'exit 130' INT TERM
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secrets/token")

start_server() {  # name, flags...: starts a server on a free loopback port, prints its address
  local name=$1; shift
  "$BIN/longattn-offload-server" --listen 127.0.0.1:0 --token-file "$secrets/token" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log" &
  local pid=$!
  server_pids+=($pid)
  echo "$pid" > "$OUT/$name.pid"  # callers run this in $(...): the array above does not reach them
  for _ in $(seq 200); do
    local port
    port=$(awk '/^LISTENING/ {print $2}' "$OUT/$name.out" 2>/dev/null)
    [ -n "$port" ] && { echo "127.0.0.1:$port"; return 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "server $name did not start:" >&2; tail -3 "$OUT/$name.log" >&2
  return 1
}

# Two CPU servers, each on its own half of the cores (one core of each half left to the client).
if [ "$NPROC" -ge 4 ]; then
  half=$(( NPROC / 2 ))
  placement0="--cpus 0-$(( half - 2 ))"; placement1="--cpus $half-$(( NPROC - 2 ))"
else
  placement0="--threads 1"; placement1="--threads 1"
fi
a0=$(start_server server0 $placement0 --memory-limit "$MEMORY_LIMIT") || exit 1
a1=$(start_server server1 $placement1 --memory-limit "$MEMORY_LIMIT") || exit 1
echo "CPU servers: $a0 ($placement0), $a1 ($placement1), memory limit $MEMORY_LIMIT each"
OFFLOAD="--servers $a0,$a1 --token-file $secrets/token --timeout-ms 120000"

# Correctness first (small, every attention compared with the CPU backend), then the timed runs.
for n in 1 2 3; do step check_cpu_servers_n$n $T "$BIN/offload_decode" --device "$DEVICE" $OFFLOAD $CHECK_MODEL --micro-batches $n --check; done
gpu && step check_local $T "$BIN/offload_decode" --device cuda --local-attention $CHECK_MODEL --check
for n in 1 2 3; do step cpu_servers_n$n $T "$BIN/offload_decode" --device "$DEVICE" $OFFLOAD $MODEL --micro-batches $n; done
gpu && step local $T "$BIN/offload_decode" --device cuda --local-attention $MODEL

# ---- 4. a GPU KV server ----
if gpu; then
  g0=$(start_server gpu_server --device cuda --memory-limit "$GPU_MEMORY_LIMIT" --threads 2) || status=1
  if [ -n "${g0:-}" ]; then
    GPU_OFFLOAD="--servers $g0 --token-file $secrets/token --timeout-ms 120000"
    step check_gpu_server $T "$BIN/offload_decode" --device cuda $GPU_OFFLOAD $CHECK_MODEL --micro-batches 2 --check
    for n in 1 2; do step gpu_server_n$n $T "$BIN/offload_decode" --device cuda $GPU_OFFLOAD $MODEL --micro-batches $n; done
    # Its GPU memory must be free again before the capacity steps measure what fits.
    gpid=$(cat "$OUT/gpu_server.pid")
    kill -TERM "$gpid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$gpid" 2>/dev/null || break; sleep 0.2; done
  fi
fi

# ---- 5. capacity ----
if gpu; then
  step capacity_find $T "$BIN/offload_decode" --device cuda --find-max-batch $CAPACITY_SHAPE
  largest=$(sed -n 's/.*"largest_gpu_batch":\([0-9]*\).*/\1/p' "$OUT/capacity_find.log")
  if [ -n "$largest" ]; then
    over=$(( largest + 2 ))
    big=$(echo "$CAPACITY_SHAPE" | sed -e "s/--batch [0-9]*/--batch $over/")
    # Refused before anything is allocated: expected to fail with one clear line.
    echo "offload_decode --device cuda --local-attention $big" > "$OUT/capacity_local.log"
    timeout -k 10 $T "$BIN/offload_decode" --device cuda --local-attention $big >> "$OUT/capacity_local.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ] && grep -q "out of GPU memory" "$OUT/capacity_local.log"; then
      echo "[capacity_local] refused as expected: $(tail -1 "$OUT/capacity_local.log" | cut -c1-200)"
    else
      status=1; echo "[capacity_local] expected an out-of-GPU-memory refusal, got exit $rc:"; tail -3 "$OUT/capacity_local.log"
    fi
    if [ "$SMALL" = 1 ]; then
      echo "[capacity_offloaded] skipped with SMALL=1 (it uploads more KV than the GPU holds)"
    elif [ $(( BUDGET_S - SECONDS )) -lt 150 ]; then
      echo "[capacity_offloaded] skipped: ${SECONDS}s spent of BUDGET_S=$BUDGET_S; it needs 2-3 minutes (the upload of more KV than the GPU holds)"
    else
      step capacity_offloaded $(( BUDGET_S - SECONDS )) "$BIN/offload_decode" --device cuda $OFFLOAD $big --micro-batches 2
    fi
  fi
fi
stop_servers
for name in server0 server1 gpu_server; do
  [ -f "$OUT/$name.out" ] && grep RESULT "$OUT/$name.out" | sed "s/^/[$name] /" | cut -c1-300
done

# ---- 6. the deployment model against the measured points ----
python3 - "$OUT" "$BIN/longattn-bench" > "$OUT/model_vs_measured.txt" 2>&1 <<'PY'
import json, os, subprocess, sys
out, bench = sys.argv[1], sys.argv[2]
def result(name):
    try:
        for line in open(os.path.join(out, name + ".log")):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    except (OSError, ValueError):
        pass
    return None
cpu_runs = {n: result(f"cpu_servers_n{n}") for n in (1, 2, 3)}
gpu_runs = {n: result(f"gpu_server_n{n}") for n in (1, 2)}
# The GPU's time per micro-batch and layer, c = fixed + tokens * per_token, fitted (least squares)
# to the CPU-server runs' measured model time per part (the GPU server shares the GPU, so its runs
# are not used for the fit).
pts = [(r["batch"] / n, r["compute_ms_per_part"]) for n, r in cpu_runs.items() if r]
if len(pts) >= 2:
    mx = sum(p[0] for p in pts) / len(pts); my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    per_token = max(1e-6, sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx) if sxx > 0 else my / mx
    fixed = max(0.0, my - per_token * mx)
elif pts:
    per_token, fixed = pts[0][1] / pts[0][0], 0.0
else:
    per_token = fixed = None
rows = []
def offload_model(r, n, servers, token_ms, fixed_ms, gbps, latency_us):
    cmd = [bench, "offload-model", "--layers", str(r["layers"]), "--hidden", str(r["heads"] * r["head_dim"]), "--heads", str(r["heads"]),
           "--kv-heads", str(r["kv_heads"]), "--head-dim", str(r["head_dim"]), "--ffn", "0", "--dtype-bytes", "2",
           "--batch", str(r["batch"]), "--context", str(r["context"] + r["steps"] // 2), "--micro-batches", str(n), "--gpus", "1",
           "--gpu-token-ms", f"{max(token_ms, 1e-6):.6f}", "--gpu-fixed-ms", f"{fixed_ms:.6f}", "--servers", str(servers),
           "--server-gbps", f"{max(gbps, 1e-3):.4f}", "--link-gbps", "0", "--link-latency-us", f"{max(latency_us, 0):.1f}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(" ".join(cmd)); print(p.stdout.strip()); print(p.stderr.strip())
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["rows"][0]["tokens_per_s"]
    return None
def kernel_ms_per_part(r, n):
    return r["server_kernel_ms_per_step"] / (r["layers"] * n)
def predict(label, runs, servers):
    # Shared inputs (a prediction across N): the GPU time fitted above, each run's server kernel
    # rate (their metrics over the decode), the round trip beyond the kernel from the N = 1 run.
    # Own parts (the pipeline arithmetic alone): the run's own model time per token, kernel rate
    # and round trip beyond the kernel.
    one = runs.get(1)
    if not one or per_token is None:
        return
    latency_us = (one["attention_ms_per_part"] - kernel_ms_per_part(one, 1)) * 1e3
    for n, r in runs.items():
        if not r:
            continue
        shared = offload_model(r, n, servers, per_token, fixed, r["server_kernel_gbps"], latency_us)
        own = offload_model(r, n, servers, r["compute_ms_per_part"] / (r["batch"] / n), 0.0, r["server_kernel_gbps"],
                            (r["attention_ms_per_part"] - kernel_ms_per_part(r, n)) * 1e3)
        rows.append({"label": label, "n": n, "servers": servers, "latency_us": latency_us, "measured": r["tokens_per_s"],
                     "predicted": shared, "own_parts": own})
predict("CPU servers", cpu_runs, 2)
predict("GPU server", gpu_runs, 1)
print("FIT " + json.dumps({"gpu_token_ms": per_token, "gpu_fixed_ms": fixed}))
for row in rows:
    print("ROW " + json.dumps(row))
PY
[ $? -eq 0 ] || { status=1; echo "[model] FAILED:"; tail -5 "$OUT/model_vs_measured.txt"; }

# ---- the tables ----
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, os, sys
out = sys.argv[1]
def result(name):
    try:
        for line in open(os.path.join(out, name + ".log")):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    except (OSError, ValueError):
        pass
    return None
def f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)
gib = 2.0 ** 30
model = {}
try:
    for line in open(os.path.join(out, "model_vs_measured.txt")):
        if line.startswith("ROW "):
            r = json.loads(line[4:]); model[(r["label"], r["n"])] = r
        if line.startswith("FIT "):
            model["fit"] = json.loads(line[4:])
except OSError:
    pass
dec = result("bench_decode") or {}
bench_gbps = dec.get("kv_gbps")

print("\n## Correctness (--check: every attention against the CPU backend)\n")
print("| run | max abs error |")
print("|---|---|")
for name in ["check_cpu_servers_n1", "check_cpu_servers_n2", "check_cpu_servers_n3", "check_gpu_server", "check_local"]:
    r = result(name)
    if r or os.path.exists(os.path.join(out, name + ".log")):
        print(f"| {name} | {f(r.get('max_error') if r else None, '{:.2g}')}{'' if r else ' (FAILED)'} |")

print("\n## Decode: offloaded with N micro-batches vs all on the GPU\n")
m = result("cpu_servers_n1") or result("local")
if m:
    print(f"{m['layers']} layers, batch {m['batch']}, context {m['context']} + {m['steps']} steps, {m['heads']}/{m['kv_heads']} heads x "
          f"{m['head_dim']}, {m['dtype']}, model on {m.get('device', 'cpu')}\n")
print("| run | N | tokens/s | bound 1/max(model, attention) | reached | model busy | ms between tokens | attention wait ms/step | "
      "model ms/part | attention ms/part | server kernel GB/s | kernel vs KV/bench rate | predicted tokens/s | error | "
      "predicted from own parts | error |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for label, prefix, ns in [("CPU servers (2)", "cpu_servers_n", (1, 2, 3)), ("GPU server (1)", "gpu_server_n", (1, 2))]:
    for n in ns:
        r = result(f"{prefix}{n}")
        if not r:
            if os.path.exists(os.path.join(out, f"{prefix}{n}.log")):
                print(f"| {label} | {n} | FAILED | | | | | | | | | | | | | |")
            continue
        # The busiest server's kernel time per step against the step's KV over the host's decode-bench rate.
        kv_ratio = None
        if label.startswith("CPU") and bench_gbps and r.get("kv_bytes_servers", 0) > 0:
            kv_ratio = r["server_kernel_ms_per_step"] / (r["kv_bytes_servers"] / (bench_gbps * 1e9) * 1e3)
        p = model.get(("CPU servers" if label.startswith("CPU") else "GPU server", n))
        pred = p["predicted"] if p else None
        own = p["own_parts"] if p else None
        err = (pred / r["tokens_per_s"] - 1) * 100 if pred and r["tokens_per_s"] else None
        own_err = (own / r["tokens_per_s"] - 1) * 100 if own and r["tokens_per_s"] else None
        print(f"| {label} | {n} | {f(r['tokens_per_s'], '{:.1f}')} | {f(r['bound_tokens_per_s'], '{:.1f}')} | "
              f"{f(r['tokens_per_s_over_bound'])} | {f(r['compute_busy_fraction'])} | {f(r['time_between_tokens_ms'])} | "
              f"{f(r['attention_wait_ms_per_step'])} | {f(r['compute_ms_per_part'], '{:.3f}')} | {f(r['attention_ms_per_part'], '{:.3f}')} | "
              f"{f(r['server_kernel_gbps'], '{:.1f}')} | {f(kv_ratio)} | {f(pred, '{:.1f}')} | {f(err, '{:+.0f}%')} | "
              f"{f(own, '{:.1f}')} | {f(own_err, '{:+.0f}%')} |")
loc = result("local")
if loc:
    print(f"| all on the GPU | - | {f(loc['tokens_per_s'], '{:.1f}')} | | | | {f(loc['decode_s'] * 1e3 / loc['steps'])} | "
          f"{f(loc['attention_ms_per_step'])} (attention) | | | | | | | | |")
if "fit" in model and model["fit"]["gpu_token_ms"] is not None:
    print(f"\nModel inputs: GPU {model['fit']['gpu_token_ms']:.4f} ms per token and layer + {model['fit']['gpu_fixed_ms']:.4f} ms per "
          f"micro-batch and layer (fitted to the CPU-server runs), each run's own server kernel GB/s, round trip beyond the kernel from "
          f"its N = 1 run (\"own parts\": each run's own model time, kernel rate and round trip); host decode-bench rate {f(bench_gbps, '{:.1f}')} GB/s ({dec.get('threads', '-')} threads).")

sc, sg, cp = result("bench_server_cpu"), result("bench_server_gpu"), result("bench_gpu_copy")
if sc or sg:
    print("\n## One server at 32 queries x 32k context (longattn-bench offload)\n" if sc and sc.get("batch") == 32 else
          "\n## One server (longattn-bench offload)\n")
    print("| server | kernel ms | end to end ms | overhead (target <= 20%) | kernel KV GB/s | device copy GB/s | kernel / copy (target >= 0.85) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in (("CPU", sc), ("GPU (--device cuda)", sg)):
        if not r:
            continue
        copy = cp.get("copy_gbs") if cp and label.startswith("GPU") else None
        print(f"| {label} | {f(r.get('kernel_ms'), '{:.3f}')} | {f(r.get('e2e_ms'), '{:.3f}')} | {f(r.get('overhead', 0) * 100, '{:.0f}%')} | "
              f"{f(r.get('kernel_gbps'), '{:.1f}')} | {f(copy, '{:.0f}')} | {f(r['kernel_gbps'] / copy if copy else None)} |")

cf, co = result("capacity_find"), result("capacity_offloaded")
if cf:
    print("\n## Capacity\n")
    print(f"All on the GPU, the largest batch that fits ({cf['layers']} layers, {cf['context']} + {cf['steps']} tokens): "
          f"**{cf['largest_gpu_batch']}** ({cf['free_gib']:.1f} GiB free).")
    try:
        refusal = [l.strip() for l in open(os.path.join(out, "capacity_local.log")) if "error" in l]
        print(f"All on the GPU at batch {cf['largest_gpu_batch'] + 2}: `{refusal[-1] if refusal else 'no error printed'}`")
    except OSError:
        pass
    if co:
        print(f"Offloaded at batch {co['batch']}: {co['tokens_per_s']:.1f} tokens/s, KV held by the servers "
              f"{co['kv_bytes_servers'] / gib:.1f} GiB, GPU memory in use {co['gpu_memory_used_bytes'] / gib:.2f} GiB.")
    else:
        print("Offloaded at that batch: not run (see the log above).")
PY
echo "status: $status (logs in $OUT; ${SECONDS}s)"
exit $status

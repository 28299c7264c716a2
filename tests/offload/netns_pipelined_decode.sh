#!/usr/bin/env bash
# Pipelined offloaded decode across real network stacks: two attention servers, each alone in its
# own network namespace, and the client in a third, joined by one veth pair per server, so every
# request crosses a network interface rather than loopback. offload_decode --check compares every
# attention result with local attention over the same KV, for 1, 2 and 3 micro-batches in flight.
# Then the failures: a server address where nothing listens, and a server killed with SIGKILL in
# the middle of the decode, must make the run fail promptly, naming the server; with --replicas 2
# the same kill must leave every answer unchanged.
#
# usage: netns_pipelined_decode.sh <longattn-offload-server binary> <offload_decode binary>
# Exits 77 (ctest's skip) with the reason where namespaces cannot be made here.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: netns_pipelined_decode.sh <longattn-offload-server binary> <offload_decode binary>" >&2
  exit 2
fi
server=$1
decode=$2
here=$(cd "$(dirname "$0")" && pwd)
result_check="python3 $here/../cluster/result_check.py"
run_limit_s=${RUN_LIMIT_S:-60}  # per offload_decode run (sanitizer builds are several times slower)
start_limit_s=10  # for a server to accept connections

skip() {
  echo "SKIP: $*"
  exit 77
}

[ "$(id -u)" -eq 0 ] || skip "network namespaces need root (ip netns add); run this test as root"
for tool in ip python3 timeout curl; do
  command -v "$tool" >/dev/null || skip "'$tool' is not installed (ip: iproute2, curl: curl)"
done

# Names carry this shell's pid, so concurrent runs never collide; the subnets live only inside the
# namespaces, so every run can use the same ones.
prefix=longattn-offload
ns_client="$prefix-$$-c"
ns_server=("$prefix-$$-s1" "$prefix-$$-s2")
client_address=(10.77.1.1 10.77.2.1)  # the client's end of the link to server 1, to server 2
server_address=(10.77.1.2 10.77.2.2)
port=7070
metrics_port=9090  # loopback of the server's own namespace
work=$(mktemp -d "${TMPDIR:-/tmp}/longattn-offload-netns.XXXXXX")
server_pid=("" "")

remove_namespace() {
  local pid
  # A server left running would keep its namespace alive.
  for pid in $(ip netns pids "$1" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  ip netns delete "$1" 2>/dev/null || true
}
cleanup() {
  local pid name
  for pid in "${server_pid[@]}"; do
    [ -n "$pid" ] || continue
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true  # reaped here, so the shell does not report it as killed
  done
  for name in "$ns_client" "${ns_server[@]}"; do remove_namespace "$name"; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A run killed outright (SIGKILL: no trap) leaves its namespaces behind: remove those whose
# creator is gone.
for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-[0-9]+-(c|s1|s2)$" || true); do
  owner=${name#"$prefix-"}
  owner=${owner%-*}
  kill -0 "$owner" 2>/dev/null || remove_namespace "$name"
done

for name in "$ns_client" "${ns_server[@]}"; do
  ip netns add "$name" 2>"$work/err" || skip "cannot create a network namespace: $(head -c 300 "$work/err")"
  ip -n "$name" link set lo up
done
# Each veth pair is made inside the client's namespace with its peer moved straight into the
# server's: no interface appears in the machine's own namespace.
for i in 0 1; do
  link="eth-s$((i + 1))"
  ip -n "$ns_client" link add "$link" type veth peer name eth-client netns "${ns_server[$i]}" 2>"$work/err" ||
    skip "cannot create a veth pair between namespaces: $(head -c 300 "$work/err")"
  ip -n "$ns_client" addr add "${client_address[$i]}/24" dev "$link"
  ip -n "$ns_client" link set "$link" up
  ip -n "${ns_server[$i]}" addr add "${server_address[$i]}/24" dev eth-client
  ip -n "${ns_server[$i]}" link set eth-client up
done

# The shared secret, readable by its owner only (the server refuses a token file others can read).
token=$work/token
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$token")

# Server i in its namespace: one decode thread, a small KV memory limit, metrics on its loopback.
start_server() {
  local i=$1
  ip netns exec "${ns_server[$i]}" "$server" --listen "${server_address[$i]}:$port" --token-file "$token" \
    --threads 1 --io-threads 1 --memory-limit 64M --metrics-listen "127.0.0.1:$metrics_port" \
    >"$work/server$i.log" 2>&1 &
  server_pid[$i]=$!
}
# Waits until server i accepts connections from the client's namespace; fails with its log if not.
wait_for_server() {
  local i=$1 deadline=$((SECONDS + start_limit_s))
  until timeout 1 ip netns exec "$ns_client" bash -c "exec 3<>/dev/tcp/${server_address[$i]}/$port" 2>/dev/null; do
    if ! kill -0 "${server_pid[$i]}" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      echo "FAIL: server $((i + 1)) does not accept connections on ${server_address[$i]}:$port"
      tail -n 20 "$work/server$i.log"
      exit 1
    fi
    sleep 0.1
  done
}
# One counter of server i's /metrics (0 while it cannot be read).
metric() {
  local i=$1 name=$2
  timeout 2 ip netns exec "${ns_server[$i]}" curl -sf "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null |
    awk -v name="$name" '$1 == name { printf "%d", $2; found = 1 } END { if (!found) printf "0" }' || true
}

for i in 0 1; do start_server "$i"; done
for i in 0 1; do wait_for_server "$i"; done
servers="${server_address[0]}:$port,${server_address[1]}:$port"

# A small model whose batch splits into 1, 2 or 3 micro-batches, bf16 KV; a fresh seed every run.
model=(--device cpu --token-file "$token" --layers 2 --batch 4 --context 600 --heads 4 --kv-heads 2 --head-dim 32
       --dtype bf16 --timeout-ms 5000 --check)
checked=(servers=2 layers=2 batch=4 context=600 heads=4 kv_heads=2 head_dim=32 dtype='"bf16"' checked=true)

# The client in its namespace, under a time limit; stdout and stderr kept apart (RESULT ends stdout).
run_client() {
  local name=$1
  shift
  timeout --kill-after=5 "$run_limit_s" ip netns exec "$ns_client" "$decode" "$@" >"$work/$name.out" 2>"$work/$name.err"
}
failures=0
fail() {
  local name=$1
  shift
  echo "FAIL: $name: $*"
  tail -n 15 "$work/$name.out" "$work/$name.err" 2>/dev/null || true
  failures=$((failures + 1))
}
# A passed --check: exit 0 (offload_decode exits 1 when any attention differs from local attention
# by 1e-3 or more) and a RESULT saying it checked.
expect_check_passed() {
  local name=$1 status=$2
  shift 2
  if [ "$status" -ne 0 ]; then
    fail "$name" "offload_decode exited with $status$([ "$status" -eq 124 ] && echo " (timed out after ${run_limit_s}s)")"
  elif ! $result_check "$work/$name.out" "$@" >"$work/$name.check" 2>&1; then
    fail "$name" "unexpected RESULT: $(grep -v '^RESULT' "$work/$name.check" | tr '\n' ' ')"
  else
    echo "ok: $name ($(grep -o 'max |error| vs local attention [^ ]*' "$work/$name.out" || true))"
  fi
}

for n in 1 2 3; do
  name=micro_batches_$n
  status=0
  run_client "$name" --servers "$servers" "${model[@]}" --steps 3 --micro-batches "$n" --seed "$((RANDOM + 1))" || status=$?
  expect_check_passed "$name" "$status" "${checked[@]}" steps=3 micro_batches="$n"
done

# A second server address where nothing listens: the run must fail, promptly, and say so.
name=unreachable_server
status=0
run_client "$name" --servers "${server_address[0]}:$port,${server_address[1]}:$((port + 1))" "${model[@]}" --steps 3 \
  --micro-batches 2 --seed "$((RANDOM + 1))" || status=$?
if [ $status -eq 0 ]; then
  fail "$name" "offload_decode succeeded with a server address where nothing listens"
elif [ $status -eq 124 ] || [ $status -eq 137 ]; then
  fail "$name" "offload_decode hung (timed out after ${run_limit_s}s) instead of failing"
elif ! grep -q "${server_address[1]}:$((port + 1))" "$work/$name.out" "$work/$name.err"; then
  fail "$name" "offload_decode failed (exit $status) without naming the unreachable server"
else
  echo "ok: $name (exit $status: $(grep -h -m1 "${server_address[1]}:$((port + 1))" "$work/$name.err" "$work/$name.out" | head -c 200))"
fi

# Server 2 is killed with SIGKILL once it has answered decode queries (its attend counter moves),
# while the client still has most of its steps to go. run_with_kill <name> <replicas> sets
# `status` (the client's exit status) and `killed` (whether the kill landed before the client ended).
kill_steps=400
run_with_kill() {
  local name=$1 replicas=$2 before client deadline
  before=$(metric 1 longattn_offload_attend_queries_total)
  timeout --kill-after=5 "$run_limit_s" ip netns exec "$ns_client" "$decode" --servers "$servers" "${model[@]}" \
    --steps "$kill_steps" --micro-batches 2 --replicas "$replicas" --seed "$((RANDOM + 1))" >"$work/$name.out" 2>"$work/$name.err" &
  client=$!
  deadline=$((SECONDS + run_limit_s))
  killed=false
  while kill -0 "$client" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
    if [ "$(metric 1 longattn_offload_attend_queries_total)" -gt "$before" ]; then
      kill -9 "${server_pid[1]}"
      wait "${server_pid[1]}" 2>/dev/null || true
      killed=true
      break
    fi
    sleep 0.05
  done
  status=0
  wait "$client" || status=$?
}

# Without replicas the KV on server 2 is gone: the run must fail, promptly, naming server 2.
name=server_killed_without_replicas
run_with_kill "$name" 1
if [ $killed != true ]; then
  fail "$name" "the decode ended before server 2 served a query: nothing was killed mid-run (raise kill_steps)"
elif [ $status -eq 0 ]; then
  fail "$name" "offload_decode succeeded although server 2 and its only copy of the KV were killed mid-decode"
elif [ $status -eq 124 ] || [ $status -eq 137 ]; then
  fail "$name" "offload_decode hung (timed out after ${run_limit_s}s) instead of failing"
elif ! grep -q "${server_address[1]}:$port" "$work/$name.err"; then
  fail "$name" "offload_decode failed (exit $status) without naming the killed server"
else
  echo "ok: $name (exit $status: $(grep -m1 "${server_address[1]}:$port" "$work/$name.err" | head -c 200))"
fi

# With --replicas 2 every piece of KV is on both servers: the reads fail over to server 1 and
# every answer must still equal local attention.
start_server 1
wait_for_server 1
name=server_killed_with_replicas
run_with_kill "$name" 2
if [ $killed != true ]; then
  fail "$name" "the decode ended before server 2 served a query: nothing was killed mid-run (raise kill_steps)"
elif [ $status -eq 0 ] && ! grep -q "the replicas serve from now on" "$work/$name.err"; then
  fail "$name" "the client never saw server 2 fail: it was not killed mid-decode (raise kill_steps)"
else
  expect_check_passed "$name" "$status" "${checked[@]}" steps="$kill_steps" micro_batches=2
fi

if [ $failures -ne 0 ]; then
  echo "netns_pipelined_decode: $failures case(s) failed"
  exit 1
fi
echo "netns_pipelined_decode: every case passed with the servers in their own network namespaces"

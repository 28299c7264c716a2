#!/usr/bin/env bash
# Launch example: N offload servers on this host (one per NUMA node when numactl is there), a
# token shared with the clients, then the decode example against them. For a real deployment use
# the systemd unit (cluster/longattn-offload-server.service) and docs/offload.md.
#
#   cluster/offload-launch.sh [--servers 2] [--base-port 7070] [--memory-limit 8G] [--bin build/bin] [-- offload_decode flags]
set -euo pipefail

servers=2 base_port=7070 memory=8G bin=build/bin listen_host=127.0.0.1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --servers) servers=$2; shift 2 ;;
    --base-port) base_port=$2; shift 2 ;;
    --memory-limit) memory=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --listen-host) listen_host=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done

workdir=$(mktemp -d -t longattn-offload.XXXXXX)
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true; wait || true; rm -rf "$workdir"' EXIT
( umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$workdir/token" )

nodes=1
if command -v numactl >/dev/null && numactl --hardware >/dev/null 2>&1; then
  nodes=$(numactl --hardware | awk '/^available:/ {print $2}')
fi
cores=$(nproc)
threads=$(( cores / servers > 0 ? cores / servers : 1 ))

pids=() addrs=()
for ((i = 0; i < servers; i++)); do
  port=$((base_port + i))
  cmd=("$bin/longattn-offload-server" --listen "$listen_host:$port" --token-file "$workdir/token"
       --threads "$threads" --memory-limit "$memory" --metrics-listen "127.0.0.1:$((port + 1000))")
  if [[ $nodes -gt 1 ]]; then
    node=$((i % nodes))
    cmd=(numactl --cpunodebind=$node --membind=$node "${cmd[@]}")
  fi
  "${cmd[@]}" > "$workdir/server$i.out" 2> "$workdir/server$i.log" &
  pids+=($!)
  addrs+=("$listen_host:$port")
done
for ((i = 0; i < servers; i++)); do  # wait until each prints LISTENING
  for _ in $(seq 100); do grep -q LISTENING "$workdir/server$i.out" 2>/dev/null && break; sleep 0.1; done
done
echo "servers: ${addrs[*]} (metrics: curl 127.0.0.1:$((base_port + 1000))/metrics)"

"$bin/offload_decode" --servers "$(IFS=,; echo "${addrs[*]}")" --token-file "$workdir/token" "$@"

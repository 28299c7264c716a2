#!/usr/bin/env bash
# Two "hosts" on one machine, each a network namespace with its own hostname, joined by a veth
# pair; Open MPI runs 2 ranks on each over TCP only, so every message between the hosts crosses a
# real network stack. Checks that longattn sees two nodes without LONGATTN_NODE_SIZE, then runs the
# ring attention example (and the hybrid strategy, where the example has --strategy) forward and
# backward, causal zigzag, GQA, against the double-precision oracle.
#
# usage: netns_two_hosts.sh <ring_attention binary> <topology_report binary>
# Exits 77 (ctest's skip) with the reason where namespaces cannot be made here.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: netns_two_hosts.sh <ring_attention binary> <topology_report binary>" >&2
  exit 2
fi
ring_attention=$1
topology_report=$2
here=$(cd "$(dirname "$0")" && pwd)
agent=$(cd "$here/../../cluster" && pwd)/netns-rsh-agent.sh
result_check="python3 $here/result_check.py"
run_limit_s=90  # per mpirun; the whole test stays far below ctest's timeout, so the trap runs

skip() {
  echo "SKIP: $*"
  exit 77
}

[ "$(id -u)" -eq 0 ] || skip "network namespaces need root (ip netns add); run this test as root"
for tool in ip unshare mpirun python3 timeout; do
  command -v "$tool" >/dev/null || skip "'$tool' is not installed (ip: iproute2, unshare: util-linux, mpirun: openmpi-bin)"
done
# The nodes must come from the hosts themselves, never from the simulation override.
unset LONGATTN_NODE_SIZE

# Names carry this shell's pid, so concurrent runs never collide; the subnet lives only inside the
# two namespaces, so every run can use the same one.
prefix=longattn-test
ns=("$prefix-$$-h1" "$prefix-$$-h2")
hostnames=("la$$-host1" "la$$-host2")
subnet=10.213.0.0/24
address=(10.213.0.1 10.213.0.2)
work=$(mktemp -d "${TMPDIR:-/tmp}/longattn-netns.XXXXXX")

remove_namespace() {
  local pid
  # Processes left in a namespace (a killed mpirun's daemons or ranks) would keep it alive.
  for pid in $(ip netns pids "$1" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  ip netns delete "$1" 2>/dev/null || true
}
cleanup() {
  local name
  for name in "${ns[@]}"; do remove_namespace "$name"; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A run killed outright (SIGKILL: no trap) leaves its namespaces behind: remove those whose
# creator is gone.
for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-[0-9]+-h[12]$" || true); do
  owner=${name#"$prefix-"}
  owner=${owner%-h?}
  kill -0 "$owner" 2>/dev/null || remove_namespace "$name"
done

ip netns add "${ns[0]}" 2>"$work/err" || skip "cannot create a network namespace: $(head -c 300 "$work/err")"
ip netns add "${ns[1]}" 2>"$work/err" || skip "cannot create a second network namespace: $(head -c 300 "$work/err")"
# The veth pair is made inside the first namespace with its peer moved straight into the second:
# its names never appear in the machine's own namespace.
ip -n "${ns[0]}" link add eth-la type veth peer name eth-la netns "${ns[1]}" 2>"$work/err" ||
  skip "cannot create a veth pair between namespaces: $(head -c 300 "$work/err")"
for i in 0 1; do
  ip -n "${ns[$i]}" link set lo up
  ip -n "${ns[$i]}" addr add "${address[$i]}/24" dev eth-la
  ip -n "${ns[$i]}" link set eth-la up
done
ip netns exec "${ns[0]}" unshare --uts true 2>"$work/err" ||
  skip "cannot give a namespace its own hostname (unshare --uts): $(head -c 300 "$work/err")"

printf '%s slots=2\n%s slots=2\n' "${address[0]}" "${address[1]}" >"$work/hostfile"
printf '%s %s %s\n' "${address[0]}" "${ns[0]}" "${hostnames[0]}" "${address[1]}" "${ns[1]}" "${hostnames[1]}" \
  >"$work/agent-hosts"
export NETNS_AGENT_HOSTS=$work/agent-hosts

# mpirun runs on host 1 (its namespace, its hostname); it reaches host 2 through the agent, as it
# would through ssh. TCP only, on the veth subnet: no shared memory, no loopback shortcut, no UCX.
mpirun_on_hosts() {
  timeout --kill-after=10 "$run_limit_s" \
    ip netns exec "${ns[0]}" unshare --uts /bin/sh -c 'hostname "$0" && exec "$@"' "${hostnames[0]}" \
    mpirun --allow-run-as-root --hostfile "$work/hostfile" -np 4 --bind-to none \
    --mca plm_rsh_agent "$agent" --mca pml ob1 --mca btl tcp,self \
    --mca btl_tcp_if_include "$subnet" --mca oob_tcp_if_include "$subnet" \
    -x OMP_NUM_THREADS=1 -x LONGATTN_COMM_TIMEOUT_S=60 "$@"
}

failures=0
# run_case <name> <expectations...> -- <program and flags>: runs it across the hosts and checks
# its RESULT line; prints the output's tail on failure.
run_case() {
  local name=$1 expectations=()
  shift
  while [ "$1" != "--" ]; do expectations+=("$1"); shift; done
  shift
  echo "== $name"
  # stdout apart from stderr: the RESULT line ends stdout, while log lines on stderr may arrive
  # through mpirun after it.
  local out=$work/$name.out err=$work/$name.err status=0
  mpirun_on_hosts "$@" >"$out" 2>"$err" || status=$?
  if [ $status -ne 0 ]; then
    echo "FAIL: $name: mpirun exited with $status$([ $status -eq 124 ] && echo " (timed out after ${run_limit_s}s)")"
    tail -n 25 "$out" "$err"
    failures=$((failures + 1))
  elif ! $result_check "$out" "${expectations[@]}"; then
    echo "FAIL: $name: unexpected RESULT"
    tail -n 25 "$out" "$err"
    failures=$((failures + 1))
  fi
}

run_case topology ranks=4 nodes=2 ranks_agree=true 'node_of_rank=[0,0,1,1]' 'local_size_of_rank=[2,2,2,2]' \
  "hostnames=[\"${hostnames[0]}\",\"${hostnames[0]}\",\"${hostnames[1]}\",\"${hostnames[1]}\"]" -- "$topology_report"

# Causal zigzag with GQA (4 query heads over 2 kv heads), odd-sized shards, forward and backward.
job=(--seq-len 1030 --heads 4 --kv-heads 2 --head-dim 32 --layout zigzag --causal --backward --check
     --check-oracle reference --dtype fp32 --device cpu --seed "$((RANDOM + 1))")
checked=(ranks=4 seq_len=1030 heads=4 kv_heads=2 layout='"zigzag"' causal=true check='"passed"' check_oracle='"reference"')
run_case ring "${checked[@]}" -- "$ring_attention" "${job[@]}"

if "$ring_attention" --help 2>/dev/null | grep -q -- "--strategy"; then
  run_case hybrid "${checked[@]}" strategy='"hybrid"' ulysses_size=2 ring_size=2 -- \
    "$ring_attention" "${job[@]}" --strategy hybrid --ulysses-size 2
  # U = 0 takes the node size from the topology: two ranks per host.
  run_case hybrid_node_size "${checked[@]}" strategy='"hybrid"' ulysses_size=2 ring_size=2 -- \
    "$ring_attention" "${job[@]}" --strategy hybrid --ulysses-size 0
  # auto probes the links inside and across the hosts; whichever split it picks must be exact.
  run_case auto "${checked[@]}" requested_strategy='"auto"' -- "$ring_attention" "${job[@]}" --strategy auto
else
  echo "note: ring_attention has no --strategy flag yet: the hybrid cases did not run"
fi

if [ $failures -ne 0 ]; then
  echo "netns_two_hosts: $failures case(s) failed"
  exit 1
fi
echo "netns_two_hosts: every case passed across two namespace hosts"

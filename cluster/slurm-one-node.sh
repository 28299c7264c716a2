#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on this machine, to try Slurm scripts (such as
# slurm-ring-attention.sbatch) without a real cluster: starts munged, slurmctld and slurmd in a
# temporary folder, runs the given command with SLURM_CONF pointing at them, and stops them all.
#
#   sudo cluster/slurm-one-node.sh [--cpus N] -- sbatch --wait cluster/slurm-ring-attention.sbatch ...
#
# Everything runs in private namespaces (process ids, network, hostname, mounts), so nothing is
# left behind even when the script is killed, two runs never share ports or names, and the
# machine's own Slurm or munge, if any, is left alone. Needs root and Debian's slurm-wlm and munge
# (scripts/setup-deps.sh installs them). Exits with the command's status; 77 where Slurm cannot be
# started here (not root, not installed, no namespaces), saying why.
set -euo pipefail

usage() {
  echo "usage: slurm-one-node.sh [--cpus N] -- <command...>" >&2
  exit 2
}
cpus=4
while [ $# -gt 0 ]; do
  case $1 in
    --cpus) [ $# -ge 2 ] || usage; cpus=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage
[[ $cpus =~ ^[1-9][0-9]*$ ]] || { echo "slurm-one-node: --cpus needs a positive integer, got '$cpus'" >&2; exit 2; }

cannot_start() {
  echo "slurm-one-node: cannot start Slurm here: $*" >&2
  exit 77
}

namespaces=(unshare --pid --fork --kill-child --mount-proc --uts --net)
if [ -z "${ONE_NODE_SLURM_INSIDE:-}" ]; then
  [ "$(id -u)" -eq 0 ] || cannot_start "slurmctld, slurmd and munged run as root here; run as root (or sudo)"
  for tool in munged slurmctld slurmd sbatch srun sinfo ip unshare; do
    command -v "$tool" >/dev/null ||
      cannot_start "'$tool' is not installed (bash scripts/setup-deps.sh installs slurm-wlm, munge, iproute2)"
  done
  probe_error=$("${namespaces[@]}" true 2>&1) || cannot_start "no private namespaces (${namespaces[*]}): $probe_error"
  # The node's name carries this process's id: Open MPI and PMIx name their session files after the
  # hostname and the job id, which two concurrent runs would otherwise share.
  ONE_NODE_SLURM_INSIDE=$$ exec "${namespaces[@]}" "$0" --cpus "$cpus" -- "$@"
fi
node=longattn-slurm-$ONE_NODE_SLURM_INSIDE
unset ONE_NODE_SLURM_INSIDE

# Inside the namespaces, this script is process 1: when it exits, the kernel ends every daemon.
address=10.214.0.1
hostname "$node"
ip link set lo up
# Slurm resolves IPv4 addresses with AI_ADDRCONFIG, which finds none where loopback is the only
# IPv4 interface: the node needs another one. This one leads nowhere (both ends sit in here).
ip link add slurm0 type veth peer name slurm1
ip addr add "$address/24" dev slurm0
ip link set slurm0 up
ip link set slurm1 up

work=$(mktemp -d "${TMPDIR:-/tmp}/longattn-slurm.XXXXXX")
daemons=()
stop_daemons() {
  local pid
  for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${daemons[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap stop_daemons EXIT
trap 'exit 130' INT TERM
show_logs() {
  local log
  for log in "$work"/log/*; do
    echo "--- $(basename "$log") (last lines)" >&2
    tail -n 15 "$log" >&2
  done
}

chmod 755 "$work"
mkdir -p "$work/munge" "$work/state" "$work/spool" "$work/log" "$work/tmp"
# The mount namespace is private: this hosts file and this /dev/shm are seen by this run only, and
# the jobs' temporary files (Open MPI's session folders among them) go to the run's own folder.
printf '127.0.0.1 localhost\n%s %s\n' "$address" "$node" >"$work/hosts"
mount --bind "$work/hosts" /etc/hosts
mount -t tmpfs -o size=1g,mode=1777 longattn-slurm-shm /dev/shm
export TMPDIR=$work/tmp

# munged insists on a key readable by its user only and a socket folder everyone may enter.
chmod 755 "$work/munge"
head -c 1024 /dev/urandom >"$work/munge/munge.key"
chmod 400 "$work/munge/munge.key"
munged --socket="$work/munge/munge.socket" --key-file="$work/munge/munge.key" --pid-file="$work/munge/munged.pid" \
  --seed-file="$work/munge/munged.seed" --log-file="$work/log/munged.log" --foreground 2>>"$work/log/munged.log" &
daemons+=($!)

# One node, no cgroups (a container often has none to give), no accounting; srun starts MPI ranks
# through PMIx by default. config_overrides lets the node offer more CPUs than the machine has, so
# a 4-task job fits on 2 cores (the ranks then share them).
cat >"$work/slurm.conf" <<EOF
ClusterName=longattn-test
SlurmctldHost=$node($address)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$work/munge/munge.socket
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
TmpFS=$work/tmp
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmix
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$node NodeAddr=$address CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=30 State=UP
EOF
export SLURM_CONF=$work/slurm.conf

for _ in $(seq 50); do [ -S "$work/munge/munge.socket" ] && break; sleep 0.1; done
[ -S "$work/munge/munge.socket" ] || { echo "slurm-one-node: munged did not start" >&2; show_logs; exit 1; }
slurmctld -D -c -f "$SLURM_CONF" >>"$work/log/slurmctld.out" 2>&1 &
daemons+=($!)
slurmd -D -f "$SLURM_CONF" >>"$work/log/slurmd.out" 2>&1 &
daemons+=($!)

# Ready once the node reports idle to the controller.
ready=0
for _ in $(seq 60); do
  if [ "$(sinfo --noheader --format=%t 2>/dev/null)" = idle ]; then ready=1; break; fi
  sleep 0.5
done
if [ $ready -ne 1 ]; then
  echo "slurm-one-node: the node did not become idle within 30 s" >&2
  show_logs
  exit 1
fi

status=0
"$@" || status=$?
if [ $status -ne 0 ]; then
  echo "slurm-one-node: '$*' exited with $status" >&2
  show_logs
fi
# 77 means "Slurm could not start" to callers; a command's own 77 must not read as that.
[ $status -eq 77 ] && status=1
exit $status

#!/usr/bin/env bash
# Open MPI launch agent for "hosts" that are network namespaces on this machine: mpirun calls it
# as `netns-rsh-agent.sh <host> <command...>` (mpirun --mca plm_rsh_agent <this script>) where it
# would call ssh, and it runs the command inside that host's namespace instead, under the host's
# own hostname (a private UTS namespace), so Open MPI and MPI_COMM_TYPE_SHARED see separate nodes.
#
# NETNS_AGENT_HOSTS names a file with one line per host: `<address-or-name> <netns> <hostname>`,
# where the first column is the name used in the hostfile. Must run as root (ip netns exec).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "netns-rsh-agent: usage: netns-rsh-agent.sh <host> <command...> (called by mpirun)" >&2
  exit 2
fi
if [ -z "${NETNS_AGENT_HOSTS:-}" ] || [ ! -r "$NETNS_AGENT_HOSTS" ]; then
  echo "netns-rsh-agent: set NETNS_AGENT_HOSTS to a readable file of '<host> <netns> <hostname>' lines" >&2
  exit 2
fi
host=$1
shift
netns="" hostname=""
while read -r name ns name_inside _; do
  if [ "$name" = "$host" ]; then netns=$ns hostname=$name_inside; break; fi
done <"$NETNS_AGENT_HOSTS"
if [ -z "$netns" ]; then
  echo "netns-rsh-agent: host '$host' is not listed in $NETNS_AGENT_HOSTS; add a '<host> <netns> <hostname>' line" >&2
  exit 2
fi
# Like ssh, hand the words to a shell: mpirun quotes the arguments of the remote orted for one.
exec ip netns exec "$netns" unshare --uts /bin/sh -c "hostname '$hostname' && $*"

#!/bin/sh
# MPICH hydra's "ssh" launcher with network namespaces for hosts (tests/daemon/test_multihost.py).
# hydra runs: netns_launcher.sh [-x] HOST COMMAND...; PTYLIVE_TEST_NETNS maps hosts to namespaces as
# "10.213.0.1=nsA,10.213.0.2=nsB". COMMAND (hydra's proxy, with --control-port back to mpiexec) runs in
# HOST's namespace (and is noted in $PTYLIVE_TEST_NETNS_LOG when set); a host that is not in the map is refused, so nothing is ever started anywhere else.
[ "$1" = "-x" ] && shift
host=$1
shift
namespace=$(printf '%s\n' "$PTYLIVE_TEST_NETNS" | tr ',' '\n' | sed -n "s/^$host=//p")
if [ -z "$namespace" ]; then
    echo "netns_launcher.sh: host $host is not one of the test's namespaces ($PTYLIVE_TEST_NETNS)" >&2
    exit 1
fi
[ -n "$PTYLIVE_TEST_NETNS_LOG" ] && echo "$host $namespace" >> "$PTYLIVE_TEST_NETNS_LOG"
exec ip netns exec "$namespace" sh -c "$*"

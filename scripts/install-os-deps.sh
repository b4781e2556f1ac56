#!/usr/bin/env bash
# OS packages for the multi-host namespace cluster tests: sshd per namespace, pdsh for
# DeepSpeed's launcher, iproute2 for netns/veth, iperf3 and nftables for doctor's fault cases,
# slurmctld/slurmd/slurm-client and munge for the real SLURM cluster (tests/cluster/slurm_cluster.py
# starts its own daemons with per-session configs; the Debian services are never enabled or started).
set -euo pipefail
need=()
for pkg in openssh-server openssh-client pdsh iproute2 iperf3 nftables slurmctld slurmd slurm-client munge; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-os-deps: missing ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
  exit 0
fi
# Keep package scripts from starting daemons (munge, slurmd, slurmctld): the tests run their own.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

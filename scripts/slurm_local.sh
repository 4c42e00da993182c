#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for the tests (CPU only): munged, slurmctld and slurmd with a
# generated slurm.conf under DIR. Prints the SLURM_CONF path on success.
#
#   scripts/slurm_local.sh install       install slurm-wlm and munge if missing (Debian, as root); else say why not
#   scripts/slurm_local.sh start DIR     (install and) start them, wait until the node is idle
#   scripts/slurm_local.sh stop DIR      stop the daemons started from DIR
set -euo pipefail
cmd=${1:?usage: slurm_local.sh install|start|stop [DIR]}

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing slurm-wlm and munge (Debian packages) for the Slurm tests" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >"$1" 2>&1 \
            || { echo "apt-get install slurm-wlm munge failed; see $1" >&2; return 3; }
    else
        echo "slurmctld/munged are not installed and cannot be installed here (needs root and apt-get)" >&2
        return 3
    fi
}

if [ "$cmd" = install ]; then
    install /tmp/i3cl-slurm-apt.log || echo "the real-Slurm test will be skipped (the stand-in Slurm tests still run)" >&2
    exit 0
fi
dir=$(mkdir -p "${2:?usage: slurm_local.sh start|stop DIR}" && cd "$2" && pwd)

stop() {
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi

install "$dir/apt.log" || exit 3
[ "$(id -u)" = 0 ] || { echo "starting slurmd needs root" >&2; exit 3; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
cpus=$(nproc)
mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
chown munge:munge "$dir/munge" 2>/dev/null || true
cat >"$dir/slurm.conf" <<EOF
ClusterName=i3cl-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
rm -f "$dir/cgroup.conf"  # cgroup support autodetected; proctrack/linuxproc and task/none use none

stop
munge_sock="$dir/munge/munge.socket"
munged --force --socket="$munge_sock" --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/seed" 2>>"$dir/log/munged.log" || { echo "munged did not start; see $dir/log" >&2; exit 3; }
# the slurm daemons and clients find munge through this socket (auth/munge's socket= option)
sed -i "s|^AuthType=auth/munge|AuthType=auth/munge\nAuthInfo=socket=$munge_sock|" "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" 2>>"$dir/log/slurmctld.err" || { echo "slurmctld did not start; see $dir/log" >&2; stop; exit 3; }
slurmd -f "$SLURM_CONF" 2>>"$dir/log/slurmd.err" || { echo "slurmd did not start; see $dir/log" >&2; stop; exit 3; }
for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "the local slurm node did not become idle within 60 s; see $dir/log" >&2
stop
exit 3

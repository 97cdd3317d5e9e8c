#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for a developer (run as root).
#
#   bash tests/slurm/up.sh          install (Debian packages, once), configure, start; idempotent
#   bash tests/slurm/up.sh --down   stop the daemons it started
#
# munged, then slurmctld and slurmd with a generated /etc/slurm/slurm.conf that names this host
# (on 127.0.0.1) with its real CPU count and memory; no systemd, no cgroups. It refuses to
# overwrite a slurm.conf it did not write, and restarts the daemons when it rewrites it. Ends when
# `sinfo` shows the node idle (a few seconds).
#
# Partitions, all on the one node: `debug` (the default; never preempted), and for the preemption
# test `preemptible` (PreemptMode=REQUEUE) and `urgent` (a higher PriorityTier: its jobs preempt
# those of `preemptible` to get CPUs). Slurm sends a preempted job SIGTERM, then SIGKILL KillWait
# (30 s) later, and re-queues it; a re-queued job may start again cred_expire + 1 s after (120 s
# by default, 30 s here).
set -euo pipefail

conf=/etc/slurm/slurm.conf
marker="# written by wdstudy tests/slurm/up.sh"
state=/var/lib/wdstudy-slurm
logs=/var/log/wdstudy-slurm

stop() {
    for daemon in slurmd slurmctld; do
        if [ -f "$state/$daemon.pid" ] && kill -0 "$(cat "$state/$daemon.pid")" 2>/dev/null; then
            kill "$(cat "$state/$daemon.pid")"
        fi
    done
    for daemon in slurmd slurmctld; do
        for _ in $(seq 50); do
            [ -f "$state/$daemon.pid" ] && kill -0 "$(cat "$state/$daemon.pid")" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$state/$daemon.pid"
    done
}

if [ "${1:-}" = "--down" ]; then
    stop
    echo "slurm: stopped"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "tests/slurm/up.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q slurmd slurmctld slurm-client munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc --all)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
    echo "tests/slurm/up.sh: $conf exists and was not written by this script; leaving it alone" >&2
    exit 1
fi
mkdir -p "$state/ctld" "$state/d" "$logs" /etc/slurm
cat > "$conf.new" <<CONF
$marker
ClusterName=wdstudy
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=30
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=300
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=OFF
PartitionName=preemptible Nodes=$host MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2 PreemptMode=OFF
CONF
if ! cmp -s "$conf.new" "$conf" 2>/dev/null; then
    mv "$conf.new" "$conf"
    stop  # a changed configuration: restart the daemons with it
else
    rm "$conf.new"
fi

# munge: a key, then the daemon (as its own user)
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1 </dev/null; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 </dev/null && break; sleep 0.1; done
fi

running() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }
running slurmctld || /usr/sbin/slurmctld
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
running slurmd || /usr/sbin/slurmd
for _ in $(seq 300); do
    s=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case "$s" in idle|mix|alloc) break ;; esac
    sleep 0.1
done
s=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
case "$s" in
    idle|mix|alloc) ;;
    drain*|down*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
                  sleep 1; s=$(sinfo -h -n "$host" -o %t 2>/dev/null || true) ;;
esac
case "$s" in
    idle|mix|alloc) echo "slurm: node $host ($cpus CPUs) is $s" ;;
    *) echo "tests/slurm/up.sh: the node did not come up (state '${s:-unknown}'); see $logs" >&2; exit 1 ;;
esac

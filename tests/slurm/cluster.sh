#!/usr/bin/env bash
# A throwaway single-node SLURM cluster for the workflow's SLURM test (Debian/Ubuntu, root).
#
#   bash tests/slurm/cluster.sh start DIR    # install if needed, configure under DIR, start the daemons
#   bash tests/slurm/cluster.sh stop DIR     # stop exactly the daemons `start DIR` started (pid files)
#   bash tests/slurm/cluster.sh can-run      # exit 0 if this machine could run it (root + apt or slurm)
#
# Everything lives under DIR: slurm.conf (use it with SLURM_CONF=DIR/slurm.conf), state, logs,
# pid files. The one thing outside it: Snakemake's job step strips SLURM_* variables before its
# nested `srun`, which then reads /etc/slurm/slurm.conf, so a symlink to ours is put there when
# no file is (and removed by stop); an existing one belongs to another cluster and `can-run`
# says no. Ports are not the defaults (another cluster may run),
# daemons are started by hand (no systemd in containers). One node, four fake
# GPUs (/dev/null clones) so GPU-requesting rules schedule, MinJobAge 300 s so the executor's
# squeue status checks still see finished jobs, no accounting.
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop|can-run [DIR]}
D=${2:-/tmp/sae-diff-slurm}
CTLD_PORT=${SAE_DIFF_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${SAE_DIFF_SLURMD_PORT:-6918}

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
               && command -v munged >/dev/null; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_one() {
  local pidfile=$1 pid
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile"); kill -TERM "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$pidfile"
}

case "$cmd" in
can-run)
  [ "$(id -u)" -eq 0 ] || { echo "not root"; exit 1; }
  have_slurm || command -v apt-get >/dev/null || { echo "no slurm and no apt-get"; exit 1; }
  if [ -e /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" != "$D/slurm.conf" ]; then
    echo "/etc/slurm/slurm.conf exists (another cluster's): job steps would read it"; exit 1
  fi
  exit 0 ;;
stop)
  stop_one "$D/pid/slurmd.pid"; stop_one "$D/pid/slurmctld.pid"; stop_one "$D/pid/munged.pid"
  if [ -f "$D/etc_link" ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$D/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf "$D/etc_link"
  fi
  exit 0 ;;
start) ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac

[ "$(id -u)" -eq 0 ] || { echo "cluster.sh: must run as root" >&2; exit 1; }
if ! have_slurm; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
fi
mkdir -p "$D"/{state,spool,log,pid,dev}

# munge: reuse a running munged (not ours to stop), else start one with a key of our own
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/munge/munged.pid "$D/pid/munged.pid"
fi

HOST=$(hostname -s)
# The node advertises room for four of the profile's largest jobs at once (32 CPUs, 4 GPUs, 128 GB;
# config_overrides: the node reports what is configured), so independent jobs run side by side as
# on a real cluster, oversubscribing a small machine: with one GPU and 8 CPUs every job waited for
# the one before it (the SLURM test's 20 jobs ran strictly one at a time, 335 s on 2 cores)
NCPU=$(( $(nproc) > 32 ? $(nproc) : 32 ))
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
NGPU=4
: > "$D/gres.conf"
for i in $(seq 0 $((NGPU - 1))); do
  [ -c "$D/dev/gpu$i" ] || mknod "$D/dev/gpu$i" c 1 3
  echo "NodeName=$HOST Name=gpu File=$D/dev/gpu$i" >> "$D/gres.conf"
done
cat > "$D/slurm.conf" <<CONF
ClusterName=saediff
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/pid/slurmctld.pid
SlurmdPidFile=$D/pid/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the node reports what is configured here, so memory requests up to this size schedule
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=300
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$HOST CPUs=$NCPU RealMemory=$(( MEM_MB > 131072 ? MEM_MB : 131072 )) Gres=gpu:$NGPU State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
if [ ! -e /etc/slurm/slurm.conf ]; then
  mkdir -p /etc/slurm && ln -s "$D/slurm.conf" /etc/slurm/slurm.conf && touch "$D/etc_link"
elif [ "$(readlink /etc/slurm/slurm.conf)" != "$D/slurm.conf" ]; then
  echo "cluster.sh: /etc/slurm/slurm.conf belongs to another cluster; not starting" >&2; exit 1
fi
export SLURM_CONF="$D/slurm.conf"
alive "$D/pid/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
alive "$D/pid/slurmd.pid" || slurmd -f "$SLURM_CONF"
for _ in $(seq 150); do
  state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
  case "$state" in
    idle*|mix*|alloc*) echo "cluster.sh: node $HOST $state (SLURM_CONF=$SLURM_CONF)"; exit 0 ;;
    down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
echo "cluster.sh: node $HOST not usable (state: ${state:-?}); logs in $D/log" >&2
exit 1

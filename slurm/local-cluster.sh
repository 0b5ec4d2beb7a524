#!/usr/bin/env bash
# A throwaway one-node SLURM cluster (Slurm 22.05 from Debian) on this machine, for trying the
# `--cluster slurm` path locally and for the project's slurm tests in CI.
# Needs: Debian bookworm (or a close relative), root, no systemd required.
#
# Usage: bash slurm/local-cluster.sh install | start | ensure | stop | status
#   install  apt-get the daemons (munge, slurmctld, slurmd, client; slurmdbd + MariaDB for sacct);
#            a no-op when they are installed
#   start    write the config and start every daemon that is not already running (idempotent)
#   ensure   install, then start: whatever is missing (what `make test` and CI call)
#   stop     stop the daemons by their pid files, in order (never by name)
#   status   print each daemon's state and `sinfo`; exit 1 unless the node is up
# Env: WITH_ACCOUNTING=1 (default) keeps slurmdbd + MariaDB so `sacct` (and thus submitit's job
# state and `slurm.status`) works; 0 drops them.
#
# Each non-default setting in the generated slurm.conf says why it is there, in the comment above it.
# Measured on a 2-core Debian bookworm VM: install 13 s (apt-get included), start 2-3 s, a no-op
# start/ensure when it is up 0.03 s.
set -euo pipefail
WITH_ACCOUNTING=${WITH_ACCOUNTING:-1}
CLUSTER_NAME=${CLUSTER_NAME:-lfqci}
DB_PASS=lfq-ci-only   # a throwaway cluster on localhost; not a secret

log() { printf '[local-cluster] %s\n' "$*"; }

install_pkgs() {
  [ "$(id -u)" = 0 ] || { echo "install needs root" >&2; exit 1; }
  local pkgs="munge slurmctld slurmd slurm-client"
  [ "$WITH_ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
  # shellcheck disable=SC2086
  if dpkg -s $pkgs >/dev/null 2>&1; then log "already installed: $pkgs"; return 0; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # package postinst scripts must not start daemons (no systemd; we start them ourselves)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $pkgs
  log "installed: $pkgs"
}

write_conf() {
  local H N MEM ACCT
  H=$(hostname -s); N=$(nproc)
  MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 ))   # MB, below physical
  if [ "$WITH_ACCOUNTING" = 1 ]; then
    ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
  else
    ACCT='AccountingStorageType=accounting_storage/none'
  fi
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > /etc/slurm/slurm.conf.new <<CONF
# written by slurm/local-cluster.sh; edits are overwritten on the next start
ClusterName=${CLUSTER_NAME}
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
# slurmctld refuses to start without a valid mail program
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups in a container: track processes by pid, no task confinement (memory not enforced)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
${ACCT}
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# the default batch_sched_delay holds every job back 3 s
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without this a job that gives no --mem is allotted ALL the node's memory and runs alone
DefMemPerCPU=1024
# submitit jobs ignore SIGTERM; a cancelled job keeps the only node busy for KillWait s
KillWait=5
ReturnToService=2
# refuse at submit a job no node could ever run (else: pending forever with Reason=PartitionConfig)
EnforcePartLimits=ALL
MaxArraySize=1001
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${N} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then
    rm /etc/slurm/slurm.conf.new
  else
    mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; CONF_CHANGED=1
  fi
  if [ "$WITH_ACCOUNTING" = 1 ]; then
    umask 077   # slurmdbd refuses a world-readable config
    cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
CONF
    chmod 600 /etc/slurm/slurmdbd.conf
    umask 022
  fi
}

wait_for() {  # wait_for SECONDS CMD...
  local t=$1; shift
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for: $*" >&2; return 1
}

alive() {  # alive PIDFILE: the daemon recorded there is running
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_up() {
  local s; s=$(sinfo -h -o %T 2>/dev/null | head -1)
  case "$s" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

start() {
  [ "$(id -u)" = 0 ] || { echo "start needs root" >&2; exit 1; }
  command -v slurmctld >/dev/null || { echo "slurm is not installed: run 'bash $0 install' first" >&2; exit 1; }
  CONF_CHANGED=0
  write_conf
  if alive /run/slurmctld.pid && alive /run/slurmd.pid && node_up; then
    if [ "$CONF_CHANGED" = 1 ]; then scontrol reconfigure; log "already running; reloaded the changed slurm.conf"
    else log "already running"; fi
    sinfo; return 0
  fi
  if ! alive /run/munge/munged.pid; then
    [ -s /etc/munge/munge.key ] || mungekey --create --force
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
  fi
  wait_for 10 bash -c 'munge -n | unmunge'
  if [ "$WITH_ACCOUNTING" = 1 ]; then
    if ! alive /run/mysqld/mysqld.pid; then
      install -d -o mysql -g mysql /run/mysqld
      # setsid: the database must outlive the shell (and any test session) that started it
      setsid /usr/sbin/mariadbd --user=mysql >>/var/log/slurm/mariadb.log 2>&1 < /dev/null &
    fi
    wait_for 60 mariadb-admin ping
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    alive /run/slurmdbd.pid || slurmdbd
    wait_for 30 sacctmgr -n show cluster
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
      sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
  fi
  alive /run/slurmctld.pid || slurmctld
  alive /run/slurmd.pid || slurmd
  # a node left DOWN/DRAINED by an earlier crash would never take jobs again
  sleep 1; sinfo -h -o %T 2>/dev/null | grep -Eq 'down|drain' && scontrol update nodename="$(hostname -s)" state=resume || true
  wait_for 60 node_up
  log "up"; sinfo
}

stop() {  # by pid file, in dependency order; never by process name
  local f p pids=()
  for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid; do
    alive "$f" || continue
    p=$(cat "$f"); kill "$p" 2>/dev/null && pids+=("$p")
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  log "stopped: ${pids[*]:-none}"
}

status() {
  local f rc=0
  for f in /run/munge/munged.pid /run/mysqld/mysqld.pid /run/slurmdbd.pid /run/slurmctld.pid /run/slurmd.pid; do
    if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): stopped"; fi
  done
  if command -v sinfo >/dev/null && node_up; then sinfo; else echo "node: not up"; rc=1; fi
  return $rc
}

case "${1:-}" in
  install) install_pkgs ;;
  start) start ;;
  ensure) install_pkgs; start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|ensure|stop|status" >&2; exit 2 ;;
esac

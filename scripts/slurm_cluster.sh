#!/usr/bin/env bash
# Single-node SLURM cluster on this machine, for add-bench's sweep launcher and tests/test_slurm.py.
#
#   scripts/slurm_cluster.sh          start (idempotent: a running, healthy cluster is left alone)
#   scripts/slurm_cluster.sh start    same
#   scripts/slurm_cluster.sh status   one status line; exit 0 when the node is up, 1 otherwise
#   scripts/slurm_cluster.sh stop     stop slurmd and slurmctld (and munged if this script started it)
#
# Runs as root. Uses Debian's slurm-wlm and munge (installed with apt-get when slurmctld is missing).
# The cluster: one node named $(hostname -s) with all `nproc` CPUs and ~90% of the available memory,
# one partition "debug" (default, no time limit), no accounting, daemons running as root.
# tests/test_slurm.py's module-scoped `slurm_cluster` fixture runs this script and skips the SLURM
# tests when it fails. Environment overrides: SLURM_CONF (config path), SLURM_WAIT_S (default 60).
#
# Timing knobs that matter for requeue tests (see scripts/README_slurm.md):
#   AuthInfo=cred_expire=10  a requeued job waits cred_expire+1 s before it may start again (default 120)
#   SchedulerParameters=sched_interval=5,bf_interval=5  pending jobs are looked at every 5 s (default 60/30)
#   KillWait=30, OverTimeLimit=0  SIGKILL 30 s after SIGTERM at the time limit; the --signal=USR2@N
#                                 warning that submitit asks for arrives before the limit.
set -euo pipefail

ACTION="${1:-start}"
WAIT_S="${SLURM_WAIT_S:-60}"
NODE="$(hostname -s)"
STATE_DIR=/run/add-bench-slurm
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm_cluster: $*" >&2; }
die() { echo "slurm_cluster: error: $*" >&2; exit 1; }

conf_path() {
    if [[ -n "${SLURM_CONF:-}" ]]; then echo "$SLURM_CONF"
    elif [[ -d /etc/slurm ]] || [[ ! -d /etc/slurm-llnl ]]; then echo /etc/slurm/slurm.conf
    else echo /etc/slurm-llnl/slurm.conf   # pre-2020 Debian/Ubuntu packages
    fi
}
CONF="$(conf_path)"
export SLURM_CONF="$CONF"

pid_alive() {  # pid_alive PIDFILE NAME: the pid in PIDFILE is running and is NAME
    local f="$1" name="$2" pid
    [[ -s "$f" ]] || return 1
    pid="$(cat "$f" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$name" ]]
}

node_state() {  # prints the node's state as sinfo reports it (e.g. idle, mixed, down*), or nothing
    pid_alive "$CTLD_PID" slurmctld || return 0   # sinfo would retry for ~10 s without a controller
    timeout 10 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true
}

node_up() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

status_line() {
    local state; state="$(node_state)"
    echo "slurm_cluster: ${state:-no-answer} node=$NODE cpus=$(nproc) conf=$CONF" \
         "slurmctld=$(pid_alive "$CTLD_PID" slurmctld && cat "$CTLD_PID" || echo down)" \
         "slurmd=$(pid_alive "$SLURMD_PID" slurmd && cat "$SLURMD_PID" || echo down)"
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME: TERM the daemon named in PIDFILE, wait up to 15 s, then KILL
    local f="$1" name="$2" pid i
    pid_alive "$f" "$name" || return 0
    pid="$(cat "$f")"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do
        [[ -d /proc/"$pid" ]] || { rm -f "$f"; return 0; }
        sleep 0.5
    done
    log "$name (pid $pid) did not stop on SIGTERM; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
}

ensure_packages() {
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        log "slurmctld/slurmd/munged missing: installing slurm-wlm and munge with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2 || die "apt-get update failed"
        apt-get install -y -q slurm-wlm munge >&2 || die "apt-get install slurm-wlm munge failed"
    fi
    command -v slurmctld >/dev/null || die "slurmctld still missing after apt-get install"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
    if munge_works; then return 0; fi
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s "$key" ]]; then
        log "creating munge key $key"
        if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key" --force
        else dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        fi
    fi
    if id munge >/dev/null 2>&1; then
        chown munge:munge /etc/munge "$key" /run/munge /var/lib/munge /var/log/munge
        chmod 0700 /etc/munge /var/log/munge; chmod 0400 "$key"; chmod 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged
    else
        chmod 0400 "$key"
        /usr/sbin/munged --force
    fi
    touch "$STATE_DIR/munge_started_here"
    local i
    for i in $(seq 1 20); do munge_works && return 0; sleep 0.5; done
    die "munged started but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
}

write_conf() {
    local cpus mem_avail_kb real_mb
    cpus="$(nproc)"
    mem_avail_kb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
    # ~90% of the memory available now, in MiB, rounded down to 256 MiB; never above MemTotal
    real_mb=$(( mem_avail_kb * 9 / 10 / 1024 / 256 * 256 ))
    (( real_mb >= 256 )) || real_mb=256
    mkdir -p "$(dirname "$CONF")" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    local tmp; tmp="$(mktemp "$(dirname "$CONF")/.slurm.conf.XXXXXX")"
    cat >"$tmp" <<EOF
# Written by add-bench scripts/slurm_cluster.sh on $(date -Is): a single-node test cluster.
ClusterName=addbench
SlurmctldHost=${NODE}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire+1 s after the requeue (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=30
KillWait=30
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mb} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONF"
    log "wrote $CONF (CPUs=$cpus RealMemory=${real_mb}MB)"
}

start() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (uid is $(id -u))"
    mkdir -p "$STATE_DIR"
    ensure_packages
    ensure_munge
    if pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd && node_up; then
        status_line; return 0
    fi
    if ! pid_alive "$CTLD_PID" slurmctld; then
        stop_pidfile "$SLURMD_PID" slurmd   # restart slurmd against the fresh conf as well
        write_conf
        /usr/sbin/slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
    fi
    if ! pid_alive "$SLURMD_PID" slurmd; then
        /usr/sbin/slurmd || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
    fi
    local deadline=$(( SECONDS + WAIT_S )) state resumed=0
    while (( SECONDS < deadline )); do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated|completing) status_line; return 0 ;;
            drain*|down*|fail*)
                if (( ! resumed )); then
                    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 1
    done
    status_line >&2
    die "node $NODE not idle after ${WAIT_S}s (state: ${state:-no answer}); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

stop() {
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    if [[ -e "$STATE_DIR/munge_started_here" ]]; then
        stop_pidfile "$MUNGE_PID" munged
        rm -f "$STATE_DIR/munge_started_here"
    fi
    echo "slurm_cluster: stopped"
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) status_line; node_up ;;
    *) die "unknown action '$ACTION'; accepted: start, stop, status" ;;
esac

#!/usr/bin/env bash
# Start (or stop) a real single-node SLURM on this machine, from Debian packages.
#
#   sudo slurm/local-cluster.sh          # install if needed, configure, start; wait until the node is idle
#   sudo slurm/local-cluster.sh start    # same
#   sudo slurm/local-cluster.sh status   # daemons and sinfo; exit 0 when the node is usable
#   sudo slurm/local-cluster.sh stop     # stop slurmctld, slurmd and munged (started by this script)
#
# For trying the templates in this folder and for the test suite / CI. Needs root on Debian 12 (bookworm;
# slurm-wlm 22.05). No systemd and no cgroups needed: proctrack/linuxproc, task/none, accounting off.
# Idempotent: when the cluster is already up with this configuration, a second call returns at once.
#
# The node advertises CPUS (default 16, env LOCAL_SLURM_CPUS) CPUs whatever the real core count
# (SlurmdParameters=config_overrides), so 16-rank jobs fit on a 2-core machine (oversubscribed).
# Jobs run as the submitting user; SlurmUser=root.
#
# Environment:
#   LOCAL_SLURM_CPUS      CPUs advertised by the node (default 16)
#   LOCAL_SLURM_TIMEOUT   seconds to wait for the node to become idle (default 60)
#   LOCAL_SLURM_CRED_EXPIRE  AuthInfo=cred_expire, which is also the delay before a requeued job may
#                         start again (default 10 s here; SLURM's default is 120 s)
#   LOCAL_SLURM_NO_INSTALL=1  never call apt-get (fail if the packages are missing)
set -euo pipefail

CMD=${1:-start}
CPUS=${LOCAL_SLURM_CPUS:-16}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-10}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
NODE=$(hostname -s)

say() { echo "local-cluster: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

pid_alive() {  # pid_alive PIDFILE: the pid in PIDFILE names a live process
    local p
    [[ -r $1 ]] || return 1
    p=$(<"$1")
    [[ $p =~ ^[0-9]+$ ]] && kill -0 "$p" 2>/dev/null
}

log_tail() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -r $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

node_state() {  # short state of our node ("idle", "down*", ...) or empty
    timeout 10 sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n1 || true
}

node_usable() {
    case "$(node_state)" in
        idle | mix | mixed | alloc | allocated | comp | completing) return 0 ;;
        *) return 1 ;;
    esac
}

slurm_version() { dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || echo '?'; }

want_conf() {  # the slurm.conf this script writes, on stdout
    cat <<EOF
# Written by mpitrain slurm/local-cluster.sh: a single-node cluster for local trials. Do not edit by hand
# (the script rewrites it, and restarts the daemons when it changes).
ClusterName=mpitrain
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=$CRED_EXPIRE
CryptoType=crypto/munge
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
# Short intervals: a requeued job (or one whose BeginTime passed) starts within seconds, not minutes.
SchedulerParameters=bf_interval=2,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

install_packages() {
    local missing=() p
    for p in slurmctld slurmd slurm-client munge; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ ${LOCAL_SLURM_NO_INSTALL:-0} == 1 ]] && die "packages missing: ${missing[*]} (LOCAL_SLURM_NO_INSTALL=1)"
    say "installing slurm-wlm munge (missing: ${missing[*]})"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -q >/dev/null || die "apt-get update failed"
    # --no-install-recommends: the recommended plugins (hdf5, influxdb, rocm, ...) add ~35 packages for nothing.
    timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
    say "installed in $((SECONDS - t0)) s (slurm-wlm $(slurm_version))"
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        return 0
    fi
    if pid_alive "$MUNGE_PID"; then  # alive but not answering: restart it
        kill "$(<"$MUNGE_PID")" 2>/dev/null || true
        sleep 1
    fi
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --force || die "munged did not start"
    for _ in $(seq 1 20); do
        timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log_tail
    die "munge does not work (munge -n | unmunge failed)"
}

stop_slurm() {
    local f p
    for f in "$SLURMD_PID" "$CTLD_PID"; do
        pid_alive "$f" || continue
        p=$(<"$f")
        kill "$p" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
        rm -f "$f"
    done
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"
    local t0=$SECONDS
    install_packages
    start_munge

    install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    local new changed=0
    new=$(want_conf)
    if [[ ! -f $CONF ]] || [[ "$(<"$CONF")" != "$new" ]]; then
        printf '%s\n' "$new" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF"
        changed=1
    fi
    if ((changed == 0)) && pid_alive "$CTLD_PID" && pid_alive "$SLURMD_PID" && node_usable; then
        say "already up: node $NODE $(node_state), $CPUS CPUs, partition debug"
        return 0
    fi
    if ((changed)) && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then
        say "slurm.conf changed: restarting the daemons"
        stop_slurm
    fi

    if ! pid_alive "$CTLD_PID"; then
        say "starting slurmctld"
        slurmctld || { log_tail; die "slurmctld failed to start"; }
    fi
    for _ in $(seq 1 40); do
        timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.5
    done
    if ! pid_alive "$SLURMD_PID"; then
        say "starting slurmd"
        slurmd || { log_tail; die "slurmd failed to start"; }
    fi

    local deadline=$((SECONDS + TIMEOUT)) st resumed=0
    while :; do
        st=$(node_state)
        case "$st" in
            idle | mix | mixed | alloc | allocated | comp | completing) break ;;
            down | down~ | drain | drng | draining | drained | fail)
                # Responding (no '*') but down or drained, e.g. from an earlier run's state: bring it back.
                if ((resumed == 0)); then
                    say "node $NODE is $st: resuming it"
                    timeout 10 scontrol update nodename="$NODE" state=resume || true
                    resumed=1
                fi
                ;;
        esac
        if ((SECONDS >= deadline)); then
            timeout 10 sinfo -N -l >&2 || true
            timeout 10 scontrol show node "$NODE" >&2 || true
            log_tail
            die "node $NODE not idle after ${TIMEOUT}s (state '${st:-?}')"
        fi
        sleep 1
    done
    say "up in $((SECONDS - t0)) s: node $NODE $st, $CPUS CPUs, partition debug (slurm-wlm $(slurm_version))"
}

status() {
    local ok=0 name f
    for name in munged slurmctld slurmd; do
        case $name in munged) f=$MUNGE_PID ;; slurmctld) f=$CTLD_PID ;; slurmd) f=$SLURMD_PID ;; esac
        if pid_alive "$f"; then
            printf '%-10s running (pid %s)\n' "$name:" "$(<"$f")"
        else
            printf '%-10s not running\n' "$name:"
            ok=1
        fi
    done
    if ((ok == 0)); then
        timeout 10 sinfo || true
        node_usable || ok=1
    fi
    return $ok
}

stop() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    stop_slurm
    if pid_alive "$MUNGE_PID"; then
        local p
        p=$(<"$MUNGE_PID")
        kill "$p" 2>/dev/null || true
        for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    fi
    say "stopped"
}

case "$CMD" in
    start | up) start ;;
    stop | down) stop ;;
    status) status ;;
    restart) stop; start ;;
    -h | --help | help) sed -n '2,20s/^# \{0,1\}//p' "$0" ;;
    *) die "unknown command '$CMD' (start, stop, status, restart)" ;;
esac

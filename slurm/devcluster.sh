#!/usr/bin/env bash
# A real two-node Slurm cluster (n1, n2) with accounting on this single host, without
# systemd, for tests and local development.  Usage:
#   devcluster.sh install | start [--dir DIR] | stop [--dir DIR] | status [--dir DIR] | env [--dir DIR]
# Environment: SD35DIST_SLURM_DIR (default /tmp/sd35dist-slurm), SD35DIST_SLURM_CTLD_PORT (16817),
# SD35DIST_SLURM_DBD_PORT (16819), SD35DIST_SLURM_NODE_PORT (17001 for n1, +1 for n2),
# SD35DIST_SLURM_DB_PORT (13306), SD35DIST_SLURM_TIMEOUT (start wait, 60 s).
set -euo pipefail

export PATH=$PATH:/usr/sbin:/sbin
DIR=${SD35DIST_SLURM_DIR:-/tmp/sd35dist-slurm}
CTLD_PORT=${SD35DIST_SLURM_CTLD_PORT:-16817}
DBD_PORT=${SD35DIST_SLURM_DBD_PORT:-16819}
NODE_PORT=${SD35DIST_SLURM_NODE_PORT:-17001} # n1; n2 gets the next port
DB_PORT=${SD35DIST_SLURM_DB_PORT:-13306}
TIMEOUT=${SD35DIST_SLURM_TIMEOUT:-60}
STOP_TIMEOUT=15
CLUSTER=sd35dev
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
BINARIES=(slurmctld slurmd sinfo sbatch sacct sacctmgr slurmdbd munged mariadbd mariadb-install-db mariadb-admin mariadb)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-n1 slurmd-n2)
STARTED=()

die() { echo "devcluster: $*" >&2; exit 1; }
log() { echo "devcluster: $*" >&2; }

set_paths() {
    DIR=$(realpath -m "$DIR")
    CONF=$DIR/slurm.conf
    RUN=$DIR/run
    MUNGE_DIR=$DIR/munge
    MUNGE_SOCK=$MUNGE_DIR/munge.socket
    DB_DIR=$DIR/mysql
    DB_SOCK=$DB_DIR/mariadbd.sock
    export SLURM_CONF=$CONF
}

parse_dir() {
    while (($#)); do
        case $1 in
            --dir) (($# >= 2)) || die "--dir needs a value"; DIR=$2; shift 2 ;;
            --dir=*) DIR=${1#--dir=}; shift ;;
            *) die "unknown argument: $1" ;;
        esac
    done
    set_paths
}

cmd_install() {
    local missing=() b p
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null || missing+=("$b"); done
    ((${#missing[@]} == 0)) && return 0
    ((EUID == 0)) || die "missing ${missing[*]}; run 'devcluster.sh install' as root"
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local apt=(apt-get -q -o DPkg::Lock::Timeout=300)
    for p in "${PACKAGES[@]}"; do
        if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [^(]'; then
            "${apt[@]}" update >&2 || die "apt-get update failed"
            break
        fi
    done
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >&2; then
        # Stale package lists give 404s: refresh once and retry.
        "${apt[@]}" update >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >&2 ||
            die "apt-get install ${PACKAGES[*]} failed"
    fi
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null || die "$b still missing after install"; done
}

# PID bookkeeping: RUN/<daemon>.pid holds the PID we started; a PID only counts while
# /proc shows the expected program in a non-zombie state (PIDs get reused).
recorded_pid() { [[ -s $RUN/$1.pid ]] && cat "$RUN/$1.pid"; }
pid_is() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ $stat == "$1 ($2) "* && ${stat#*) } != Z* ]]
}
alive() {
    local pid
    pid=$(recorded_pid "$1") || return 1
    pid_is "$pid" "${1%-n[0-9]}"
}
any_alive() { local d; for d in "${DAEMONS[@]}"; do alive "$d" && return 0; done; return 1; }
all_alive() { local d; for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done; }

# Daemons get their own session, no inherited fds (a caller's pipe or our lock) and
# stdout/stderr in RUN/<name>.out, so that callers capturing our output do not hang.
launch() {
    local name=$1; shift
    setsid "$@" </dev/null >"$RUN/$name.out" 2>&1 9>&- &
    echo "$!" >"$RUN/$name.pid"
    STARTED+=("$name")
}

wait_for() {
    local what=$1 deadline=$((SECONDS + TIMEOUT)) d; shift
    until "$@" >/dev/null 2>&1; do
        for d in "${STARTED[@]}"; do alive "$d" || die "$d exited while waiting for $what"; done
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.1
    done
}

# Slurm daemons run with -D and also log to stderr, so RUN/<name>.out holds their whole
# log for this start, early configuration errors included.
logs_of() {
    case $1 in
        munged) echo "$MUNGE_DIR/munged.log" "$RUN/munged.out" ;;
        mariadbd) echo "$DB_DIR/mariadbd.log" "$RUN/mariadbd.out" ;;
        *) echo "$RUN/$1.out" ;;
    esac
}

dump_logs() {
    local d f
    for d in "${DAEMONS[@]}"; do
        for f in $(logs_of "$d"); do
            [[ -s $f ]] || continue
            echo "----- last 40 lines of $f -----" >&2
            tail -n 40 "$f" >&2
        done
    done
}

on_start_exit() {
    local rc=$?
    ((rc == 0)) && return 0
    log "start failed; daemon logs follow"
    dump_logs
    stop_all || true
    exit "$rc"
}

start_munge() {
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key")
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_DIR/munged.pid"
    # munged daemonizes once it is ready; its own pid file names the daemon.
    runuser -u munge -- munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >"$RUN/munged.out" 2>&1 9>&- ||
        die "munged failed to start"
    cp "$MUNGE_DIR/munged.pid" "$RUN/munged.pid"
    STARTED+=(munged)
    wait_for "the munge socket" test -S "$MUNGE_SOCK"
}

start_mariadb() {
    mkdir -p "$DB_DIR"
    if [[ ! -d $DB_DIR/data/mysql ]]; then
        rm -rf "$DB_DIR/data"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db >"$RUN/mariadb-install-db.out" 2>&1 ||
            die "mariadb-install-db failed (see $RUN/mariadb-install-db.out)"
    fi
    # Durability settings are relaxed: this database only holds test-job accounting.
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$DB_DIR/data" \
        --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$DB_DIR/mariadbd.pid" --log-error="$DB_DIR/mariadbd.log" \
        --skip-log-bin --skip-name-resolve --innodb-buffer-pool-size=64M \
        --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0
    wait_for "mariadbd on $DB_SOCK" mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping
    if [[ ! -s $DB_DIR/slurm.pw ]]; then
        (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$DB_DIR/slurm.pw")
    fi
    DB_PW=$(cat "$DB_DIR/slurm.pw")
    mariadb --no-defaults --socket="$DB_SOCK" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PW';
        ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PW';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
        die "could not create the slurm database user"
}

write_configs() {
    local host
    host=$(hostname -s)
    (
        umask 077
        cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PW
StorageLoc=slurm_acct_db
EOF
    )
    chmod 0600 "$DIR/slurmdbd.conf"
    cat >"$DIR/cgroup.conf" <<EOF
# Generated by devcluster.sh: process tracking only (cgroup v1 freezer); no resource limits.
CgroupPlugin=cgroup/v1
CgroupAutomount=yes
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
EOF
    cat >"$CONF" <<EOF
# Generated by devcluster.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire=5 (the minimum) keeps the requeue delay at a few seconds.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=5
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# Production clusters track a step's processes by cgroup: when the step ends, every process
# in it dies, so an orphaned worker cannot finish a save that its step no longer owns.
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
# batch_sched_delay=0: a submitted batch job starts in ~0.5 s instead of ~2 s.
SchedulerParameters=sched_interval=2,batch_sched_delay=0
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmdSpoolDir=$DIR/%n
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Without this, slurmctld and sacct reach slurmdbd through munge's default socket.
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=$NODE_PORT-$((NODE_PORT + 1)) CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=dev Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

nodes_idle() { [[ $(sinfo -h -N -p dev -o '%N %T' | sort -u | tr '\n' ' ') == "n1 idle n2 idle " ]]; }
cluster_known() { sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; }

check_ports_free() {
    local var port
    for var in SD35DIST_SLURM_DB_PORT:$DB_PORT SD35DIST_SLURM_DBD_PORT:$DBD_PORT \
        SD35DIST_SLURM_CTLD_PORT:$CTLD_PORT SD35DIST_SLURM_NODE_PORT:$NODE_PORT \
        SD35DIST_SLURM_NODE_PORT+1:$((NODE_PORT + 1)); do
        port=${var##*:}
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port (${var%:*}) is already in use; pick another with that variable"
        fi
    done
}

cmd_start() {
    cmd_install
    if all_alive; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if any_alive; then
        log "some daemons in $DIR are down; restarting the cluster"
        stop_all
    fi
    check_ports_free
    local t0=$SECONDS
    trap on_start_exit EXIT
    mkdir -p "$RUN" "$DIR/state" "$DIR/n1" "$DIR/n2"
    start_munge
    start_mariadb
    write_configs
    launch slurmdbd slurmdbd -D
    wait_for "slurmdbd" sacctmgr -n list cluster
    cluster_known || sacctmgr -i add cluster "$CLUSTER" >"$RUN/sacctmgr.out" 2>&1 ||
        die "sacctmgr add cluster $CLUSTER failed: $(cat "$RUN/sacctmgr.out")"
    launch slurmctld slurmctld -D -f "$CONF"
    launch slurmd-n1 slurmd -D -f "$CONF" -N n1
    launch slurmd-n2 slurmd -D -f "$CONF" -N n2
    wait_for "nodes n1 and n2 to be idle" nodes_idle
    wait_for "sacct" sacct -n -X
    trap - EXIT
    log "cluster $CLUSTER up in $DIR after $((SECONDS - t0))s"
    echo "export SLURM_CONF=$CONF"
}

cancel_jobs() {
    local ids deadline
    ids=$(squeue -h -o %A 2>/dev/null) || return 0
    [[ -n $ids ]] || return 0
    # shellcheck disable=SC2086 # one argument per job id
    scancel $ids 2>/dev/null || true
    # Jobs (and their slurmstepd) outlive slurmd, so let them end first.
    deadline=$((SECONDS + STOP_TIMEOUT))
    while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.2; done
}

stop_group() {
    local d pids=() deadline pid
    for d; do
        if alive "$d"; then
            pid=$(recorded_pid "$d")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$d")
        fi
    done
    deadline=$((SECONDS + STOP_TIMEOUT))
    for d in "${pids[@]}"; do
        while alive "$d" && ((SECONDS < deadline)); do sleep 0.1; done
        if alive "$d"; then
            log "$d did not exit within ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$(recorded_pid "$d")" 2>/dev/null || true
            deadline=$((SECONDS + 2))
            while alive "$d" && ((SECONDS < deadline)); do sleep 0.1; done
        fi
    done
    for d; do rm -f "$RUN/$d.pid"; done
}

stop_all() {
    alive slurmctld && cancel_jobs
    stop_group slurmd-n1 slurmd-n2
    stop_group slurmctld
    stop_group slurmdbd
    stop_group mariadbd
    stop_group munged
}

cmd_status() {
    local d rc=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d: running (pid $(recorded_pid "$d"))"
        else
            echo "$d: stopped"
            rc=1
        fi
    done
    if alive slurmctld; then sinfo || rc=1; fi
    return "$rc"
}

main() {
    local cmd=${1:-}
    (($#)) && shift
    case $cmd in
        install) (($# == 0)) || die "install takes no arguments"; cmd_install; return ;;
        start | stop | status | env) parse_dir "$@" ;;
        -h | --help | help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; return ;;
        *) die "usage: devcluster.sh install|start|stop|status|env [--dir DIR]" ;;
    esac
    case $cmd in
        env) echo "export SLURM_CONF=$CONF"; return ;;
        status) cmd_status; return ;;
    esac
    mkdir -p "$RUN"
    # Serialise start/stop on one DIR; launched daemons close fd 9 so they do not hold it.
    exec 9>"$DIR/.lock"
    flock 9
    case $cmd in
        start) cmd_start ;;
        stop) stop_all ;;
    esac
}

main "$@"

#!/usr/bin/env bash
# Start a single-node SLURM on localhost, with fake GPUs, for testing the SLURM profile.
#
# What it does (needs root):
#   1. installs the Debian packages munge, slurmctld, slurmd, slurm-client when missing;
#   2. starts munged (as user munge) on its own socket and key under the scratch folder;
#   3. writes slurm.conf and gres.conf in the scratch folder: one node "localhost" with the
#      CPUs and memory `slurmd -C` reports and N fake GPUs (GRES backed by character devices
#      made with mknod, major 1 minor 3, i.e. /dev/null), one default partition;
#   4. starts slurmctld, then slurmd, and waits until the node is idle;
#   5. records the PIDs it started in $MIXACM_SLURM_DIR/pids (stop.sh stops exactly those);
#   6. links /etc/slurm/slurm.conf to its slurm.conf (srun inside jobs reads only that path).
# Running it again while its cluster is up does nothing and exits 0.
#
# No accounting database: jobs are recorded by jobcomp/filetxt ($MIXACM_SLURM_DIR/log/jobcomp.log)
# and Snakemake's SLURM executor must query job status with squeue
# (`slurm-status-command: squeue`, see workflow/profiles/slurm-test/config.yaml).
#
# Settings (environment):
#   MIXACM_SLURM_DIR        scratch folder for config, state, logs, sockets  [/tmp/mixacm-slurm]
#   MIXACM_SLURM_GPUS       number of fake GPUs on the node                  [2]
#   MIXACM_SLURM_PARTITION  name of the (default) partition                 [local]
#   MIXACM_SLURM_WAIT       seconds to wait for the node to become idle     [60]
# Afterwards: export SLURM_CONF=$MIXACM_SLURM_DIR/etc/slurm.conf (the script prints it).
set -euo pipefail

DIR="${MIXACM_SLURM_DIR:-/tmp/mixacm-slurm}"
GPUS="${MIXACM_SLURM_GPUS:-2}"
PARTITION="${MIXACM_SLURM_PARTITION:-local}"
WAIT_S="${MIXACM_SLURM_WAIT:-60}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF="$DIR/etc/slurm.conf"
PIDS="$DIR/pids"
export SLURM_CONF="$CONF"

die() { echo "start.sh: error: $*" >&2; exit 1; }
log() { echo "start.sh: $*" >&2; }

[[ "$(id -u)" == 0 ]] || die "needs root (it installs packages and starts munged/slurmctld/slurmd)"
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "MIXACM_SLURM_GPUS must be a non-negative integer, got '$GPUS'"
[[ "$PARTITION" =~ ^[A-Za-z0-9_-]+$ ]] || die "MIXACM_SLURM_PARTITION '$PARTITION' is not a valid partition name"
[[ "$DIR" = /* ]] || die "MIXACM_SLURM_DIR must be an absolute path, got '$DIR'"

# A PID in the record counts as ours only while it is alive and runs the daemon we started:
# a recycled PID must never be mistaken for (or killed as) one of our daemons.
pid_is() {  # pid_is NAME PID
    [[ -n "$2" && -r "/proc/$2/comm" ]] && [[ "$(cat "/proc/$2/comm")" == "$1" ]]
}

# --- already running? -------------------------------------------------------------------
if [[ -f "$PIDS" ]]; then
    alive=0
    while read -r name pid; do
        pid_is "$name" "$pid" && alive=$((alive + 1))
    done < "$PIDS"
    if [[ "$alive" == 3 ]] && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
        log "cluster already running (PIDs in $PIDS)"
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    log "found a stale or partial cluster in $DIR; stopping what is left of it"
    "$HERE/stop.sh"
fi

# --- packages ----------------------------------------------------------------------------
missing=()
for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install munge/slurm"
    log "installing munge slurmctld slurmd slurm-client (missing: ${missing[*]})"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
        || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null \
        || die "apt-get install munge slurmctld slurmd slurm-client failed"
fi

# --- ports must be free: another SLURM on this machine would take our jobs or refuse ours ---
for port in 6817 6818; do
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
        die "port $port is already in use (another slurmctld/slurmd?); stop it first"
    fi
done

# --- scratch layout --------------------------------------------------------------------------
rm -rf "$DIR"
mkdir -p "$DIR"/{etc,state,spool,log,run,dev,munge}
chmod 755 "$DIR" "$DIR"/*

# --- munge: own key and socket, so a system munged (if any) is left alone ---------------------
chown munge:munge "$DIR/munge"
runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key" \
    || die "mungekey could not create $DIR/munge/munge.key"
runuser -u munge -- munged \
    --socket="$DIR/munge/munge.socket" \
    --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" \
    --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start; see $DIR/munge/munged.log"
: > "$PIDS"

# --- fake GPUs: character devices slurmd accepts as GRES files --------------------------------
gres_node=""
if ((GPUS > 0)); then
    for ((i = 0; i < GPUS; i++)); do
        mknod "$DIR/dev/gpu$i" c 1 3 || die "mknod $DIR/dev/gpu$i failed (no permission to create devices?)"
    done
    gres_node=" Gres=gpu:$GPUS"
    echo "AutoDetect=off" > "$DIR/etc/gres.conf"
    echo "NodeName=localhost Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >> "$DIR/etc/gres.conf"
else
    : > "$DIR/etc/gres.conf"
fi

# --- task prolog: a "print" line of its output goes to the task's own output (the job log) ---
cat > "$DIR/etc/task_prolog.sh" <<'EOF'
#!/bin/sh
echo "print mixacm-slurm task: job $SLURM_JOB_ID step ${SLURM_STEP_ID:-batch} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}"
EOF
chmod 755 "$DIR/etc/task_prolog.sh"

# --- slurm.conf ------------------------------------------------------------------------------
# The node line comes from `slurmd -C` (its CPU and memory layout), renamed to localhost.
hw="$(slurmd -C | head -n 1 | sed -E 's/^NodeName=[^ ]+ //')"
[[ "$hw" == CPUs=* ]] || die "unexpected output of 'slurmd -C': $hw"
cat > "$CONF" <<EOF
# Written by scripts/slurm/start.sh: a single-node test cluster on localhost.
ClusterName=mixacm-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
ReturnToService=2
MailProg=/bin/true
# Finished jobs stay listed (squeue, scontrol show job) for an hour: Snakemake's squeue status
# checks and the tests read them after a whole workflow has run.
MinJobAge=3600
# Every task (the batch script and srun steps) prints which GPUs it was given into its job log.
TaskProlog=$DIR/etc/task_prolog.sh
# scancel: SIGTERM, then SIGKILL after this many seconds.
KillWait=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
NodeName=localhost NodeAddr=127.0.0.1 $hw$gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

# srun inside a job (Snakemake's job step runs the rule through it) does not see SLURM_CONF and
# reads /etc/slurm/slurm.conf: point that at ours, unless it belongs to another cluster.
ETC_CONF=/etc/slurm/slurm.conf
if [[ -e "$ETC_CONF" || -L "$ETC_CONF" ]] && [[ "$(readlink "$ETC_CONF")" != "$CONF" ]]; then
    die "$ETC_CONF exists and is not a link to $CONF: this machine has its own SLURM configuration"
fi
mkdir -p /etc/slurm
ln -sfn "$CONF" "$ETC_CONF"

# --- daemons ---------------------------------------------------------------------------------
# Each daemon forks and writes its PID file a moment later: wait for it (bounded), check that
# the PID runs the daemon, and record it before starting the next one.
record_pid() {  # record_pid NAME PIDFILE LOGFILE
    local pid=""
    for ((t = 0; t < 100; t++)); do
        pid="$(cat "$2" 2>/dev/null || true)"
        pid_is "$1" "$pid" && break
        sleep 0.1
    done
    # A daemon that exits right after writing its PID file failed on its configuration.
    sleep 0.5
    pid_is "$1" "$pid" || { tail -n 5 "$3" >&2 || true; die "$1 did not start (log above, in $3)"; }
    echo "$1 $pid" >> "$PIDS"
}
record_pid munged "$DIR/munge/munged.pid" "$DIR/munge/munged.log"
slurmctld -f "$CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
record_pid slurmctld "$DIR/run/slurmctld.pid" "$DIR/log/slurmctld.log"
slurmd -f "$CONF" -N localhost || die "slurmd did not start; see $DIR/log/slurmd.log"
record_pid slurmd "$DIR/run/slurmd.pid" "$DIR/log/slurmd.log"

# --- wait until the node takes jobs ------------------------------------------------------------
# sinfo retries for a long time when it cannot reach slurmctld: bound each call and the total.
state=""
deadline=$((SECONDS + WAIT_S))
while ((SECONDS < deadline)); do
    state="$(timeout 5 sinfo -h -n localhost -o %T 2>/dev/null || true)"
    [[ "$state" == idle ]] && break
    sleep 0.5
done
if [[ "$state" != idle ]]; then
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node localhost is '${state:-unknown}', not idle, after ${WAIT_S}s (logs above); stop with scripts/slurm/stop.sh"
fi
log "cluster up: partition '$PARTITION', $GPUS fake GPU(s), PIDs in $PIDS"
echo "export SLURM_CONF=$CONF"

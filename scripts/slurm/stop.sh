#!/usr/bin/env bash
# Stop the local test cluster started by start.sh: exactly the daemons whose PIDs start.sh
# recorded in $MIXACM_SLURM_DIR/pids, in reverse start order (slurmd, slurmctld, munged).
# A recorded PID that no longer runs the daemon it named (exited, or recycled) is skipped.
# Running it when nothing is up is harmless. Jobs still queued or running are cancelled first.
set -euo pipefail

DIR="${MIXACM_SLURM_DIR:-/tmp/mixacm-slurm}"
PIDS="$DIR/pids"

log() { echo "stop.sh: $*" >&2; }

if [[ ! -f "$PIDS" ]]; then
    log "no cluster recorded in $PIDS; nothing to stop"
    exit 0
fi

pid_is() {  # pid_is NAME PID
    [[ -n "$2" && -r "/proc/$2/comm" ]] && [[ "$(cat "/proc/$2/comm")" == "$1" ]]
}

# Jobs run under slurmstepd, which outlives slurmd: cancel them through our own controller
# first, so that no job process is left behind.
export SLURM_CONF="$DIR/etc/slurm.conf"
jobs="$(timeout 10 squeue -h -o %i 2>/dev/null || true)"
if [[ -n "$jobs" ]]; then
    log "cancelling jobs still queued or running: $(echo $jobs)"
    timeout 10 scancel $jobs 2>/dev/null || true
    for ((t = 0; t < 150; t++)); do
        pgrep -x slurmstepd >/dev/null || break
        sleep 0.1
    done
fi

failed=0
# tac: stop in reverse order, so slurmd leaves before slurmctld and munged goes last.
while read -r name pid; do
    if ! pid_is "$name" "$pid"; then
        log "$name (PID $pid) is not running"
        continue
    fi
    kill -TERM "$pid"
    for ((t = 0; t < 100; t++)); do
        pid_is "$name" "$pid" || break
        sleep 0.1
    done
    if pid_is "$name" "$pid"; then
        log "$name (PID $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" || true
        sleep 0.5
    fi
    if pid_is "$name" "$pid"; then
        log "could not stop $name (PID $pid)"
        failed=1
    else
        log "stopped $name (PID $pid)"
    fi
done < <(tac "$PIDS")

if ((failed)); then
    exit 1
fi
rm -f "$PIDS"
# The link start.sh made for srun inside jobs; anything else at that path is not ours.
if [[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" == "$DIR/etc/slurm.conf" ]]; then
    rm -f /etc/slurm/slurm.conf
fi

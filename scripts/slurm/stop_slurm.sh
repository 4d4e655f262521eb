#!/usr/bin/env bash
# Stop the daemons scripts/slurm/start_slurm.sh started, and only those (their pids are in
# $SLURM_CI_DIR/run/*.bgpid; a pid whose process is not that daemon any more is left alone),
# and undo its /etc changes.
#   SLURM_CI_PURGE=1   also delete state, spool, database and logs (next start is a new cluster)
set -uo pipefail
D=${SLURM_CI_DIR:-/tmp/convnextv2_slurm}
export SLURM_CONF=$D/etc/slurm.conf

live() {  # the pid exists and is not a zombie
  local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$st" ] && [[ "$st" != Z* ]]
}
stop_daemon() {  # stop_daemon <name> <exe substring>
  local f="$D/run/$1.bgpid" pid exe
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  exe=$(readlink -f "/proc/$pid/exe" 2>/dev/null || true)
  if kill -0 "$pid" 2>/dev/null && [[ "$exe" == *"$2"* ]]; then
    kill -TERM "$pid"
    for _ in $(seq 1 200); do live "$pid" || break; sleep 0.1; done
    if live "$pid"; then echo "[stop_slurm] $1 ($pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid"; fi
    echo "[stop_slurm] stopped $1 (pid $pid)"
  else
    echo "[stop_slurm] $1 (pid $pid) not running (or the pid is another process now): skipped"
  fi
  rm -f "$f"
}

# cancel this cluster's jobs first, so no job process outlives its slurmd
if [ -f "$D/run/slurmctld.bgpid" ] && live "$(cat "$D/run/slurmctld.bgpid")"; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel --quiet --full $jobs 2>/dev/null
    for _ in $(seq 1 150); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
  fi
fi

for f in "$D"/run/slurmd.*.bgpid; do
  [ -e "$f" ] || continue
  stop_daemon "$(basename "$f" .bgpid)" slurmd
done
stop_daemon slurmctld slurmctld
stop_daemon slurmdbd slurmdbd
stop_daemon mariadb mariadbd
stop_daemon munged munged

# /etc/hosts may be a bind mount: rewrite it in place, never rename over it
if grep -q '# slurm_ci$' /etc/hosts; then
  grep -v '# slurm_ci$' /etc/hosts > "$D/hosts.tmp" && cat "$D/hosts.tmp" > /etc/hosts && rm -f "$D/hosts.tmp"
fi
[ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$D/etc/slurm.conf" ] && rm -f /etc/slurm/slurm.conf

if [ "${SLURM_CI_PURGE:-0}" = 1 ]; then
  rm -rf "$D"/{state,spool,mysql,log,run,etc}
  echo "[stop_slurm] purged $D"
fi
exit 0

#!/usr/bin/env bash
# Start a throw-away Slurm cluster on this one host, for the tests (Debian/Ubuntu, as root).
#
# Two simulated compute nodes n1, n2 (one slurmd each, all on this host), accounting through
# slurmdbd + MariaDB (submitit reads job states with sacct), and two partitions:
#   debug   default, preemptible: a job preempted by `urgent` is requeued (PreemptMode=REQUEUE)
#   urgent  higher PriorityTier, MaxTime 60 min (so the tests can ask for too much time)
# Installs Debian's packages when they are missing. Idempotent: daemons already running
# (pid file + live process) are kept. Everything lives in $SLURM_CI_DIR; scripts/slurm/
# stop_slurm.sh stops exactly the daemons this script started.
#
#   SLURM_CI_DIR=/tmp/convnextv2_slurm   config, state, logs, pid files, database
#   SLURM_CI_NODES=2                     simulated nodes (1 = one node named `hostname -s`)
#   SLURM_CI_CPUS=2                      CPUs each node advertises (may exceed the real cores)
#   SLURM_CI_MEM_MB=8000                 RealMemory of each node
#   SLURM_CI_DB_PORT=3307                MariaDB port (127.0.0.1 only)
#   SLURM_CI_LINK_ETC=1                  symlink /etc/slurm/slurm.conf to our config, so the
#                                        Slurm commands work without SLURM_CONF set
set -euo pipefail

D=${SLURM_CI_DIR:-/tmp/convnextv2_slurm}
NODES=${SLURM_CI_NODES:-2}
CPUS=${SLURM_CI_CPUS:-2}
MEM=${SLURM_CI_MEM_MB:-8000}
DBPORT=${SLURM_CI_DB_PORT:-3307}
LINK_ETC=${SLURM_CI_LINK_ETC:-1}
export SLURM_CONF=$D/etc/slurm.conf
H=$(hostname -s)
T0=$(date +%s%N)
say() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[start_slurm +%d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() { echo "[start_slurm] $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
mkdir -p "$D"/{etc,state,log,run}

# ---------------------------------------------------------------- packages
pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
# `dpkg -s` also succeeds for a removed package whose config files remain: ask for its status
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$D/log/apt.log" 2>&1 || { cat "$D/log/apt.log"; die "apt-get update failed"; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$D/log/apt.log" 2>&1 \
    || { tail -30 "$D/log/apt.log"; die "apt-get install failed"; }
  say "installed"
fi

# ---------------------------------------------------------------- helpers
# $D/run/<name>.bgpid holds the pid of a daemon this script started.
ours_alive() {  # ours_alive <name> <exe substring>
  local f="$D/run/$1.bgpid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || return 1
  [[ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" == *"$2"* ]]
}
wait_until() {  # wait_until <seconds> <command...>
  local n=$(( $1 * 10 )); shift
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

# ---------------------------------------------------------------- names -> 127.0.0.1
# Lines we add end in "# slurm_ci" so stop_slurm.sh removes exactly them. /etc/hosts may lack a
# final newline: add one first, or our line would be glued to the last entry.
add_host() {
  getent hosts "$1" >/dev/null 2>&1 && return 0
  [ -s /etc/hosts ] && [ "$(tail -c1 /etc/hosts | od -An -c | tr -d ' ')" != '\n' ] && echo >> /etc/hosts
  echo "127.0.0.1 $1 # slurm_ci" >> /etc/hosts
}
add_host "$H"
if [ "$NODES" -ge 2 ]; then NAMES=$(seq -f 'n%g' 1 "$NODES"); else NAMES=$H; fi
for n in $NAMES; do add_host "$n"; mkdir -p "$D/spool/slurmd.$n"; done

# ---------------------------------------------------------------- munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
  fi
  mkdir -p /var/lib/munge /var/log/munge /run/munge
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged   # daemonizes; writes /run/munge/munged.pid
  wait_until 10 test -s /run/munge/munged.pid || die "munged wrote no pid file"
  cp /run/munge/munged.pid "$D/run/munged.bgpid"
  wait_until 10 bash -c 'munge -n | unmunge' || { tail /var/log/munge/munged.log; die "munged does not answer"; }
  say "munged started (pid $(cat "$D/run/munged.bgpid"))"
fi

# ---------------------------------------------------------------- config (only while slurmctld is down)
if ! ours_alive slurmctld slurmctld; then
  NODELINES=""
  for n in $NAMES; do
    if [ "$NODES" -ge 2 ]; then
      i=${n#n}; extra="NodeHostname=$H Port=$((17000 + i))"
    else
      extra=""
    fi
    NODELINES+="NodeName=$n $extra NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN"$'\n'
  done
  cat > "$D/etc/slurm.conf" <<CONF
# written by scripts/slurm/start_slurm.sh
ClusterName=convnextv2ci
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# nodes may advertise more CPUs than the host has
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
# a preempted job also gets its --signal (submitit: USR2) right away
SlurmctldParameters=preempt_send_user_signal
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd.%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$NODELINES
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=60 State=UP PriorityTier=2 PreemptMode=OFF
CONF
  cat > "$D/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
DebugLevel=info
CONF
  chmod 600 "$D/etc/slurmdbd.conf"
fi

if [ "$LINK_ETC" = 1 ]; then
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ "$(readlink /etc/slurm/slurm.conf)" = "$D/etc/slurm.conf" ]; then
    ln -sfn "$D/etc/slurm.conf" /etc/slurm/slurm.conf
  else
    say "note: /etc/slurm/slurm.conf is not ours; use: export SLURM_CONF=$SLURM_CONF"
  fi
fi

# ---------------------------------------------------------------- MariaDB + slurmdbd
M=$D/mysql
if ours_alive mariadb mariadbd; then
  say "mariadbd already running"
else
  if [ ! -d "$M/data/mysql" ]; then
    mkdir -p "$M/data"; chown -R mysql:mysql "$M"
    mariadb-install-db --user=mysql --datadir="$M/data" --auth-root-authentication-method=socket \
      --skip-test-db >"$D/log/mariadb-install.log" 2>&1 || { tail "$D/log/mariadb-install.log"; die "mariadb-install-db failed"; }
  fi
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$M/data" --socket="$M/mysqld.sock" \
    --pid-file="$M/mysqld.pid" --bind-address=127.0.0.1 --port="$DBPORT" --log-error="$M/mariadb.err" \
    --skip-name-resolve --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
    >"$D/log/mariadb.stdout" 2>&1 </dev/null &
  echo $! > "$D/run/mariadb.bgpid"
  wait_until 60 mariadb-admin --socket="$M/mysqld.sock" ping || { tail -20 "$M/mariadb.err"; die "mariadbd did not start"; }
  mariadb --socket="$M/mysqld.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  say "mariadbd started (pid $(cat "$D/run/mariadb.bgpid"))"
fi
if ours_alive slurmdbd slurmdbd; then
  say "slurmdbd already running"
else
  setsid slurmdbd -D >"$D/log/slurmdbd.stdout" 2>&1 </dev/null &
  echo $! > "$D/run/slurmdbd.bgpid"
  wait_until 60 sacctmgr -n list cluster || { tail -20 "$D/log/slurmdbd.stdout"; die "slurmdbd did not start"; }
  say "slurmdbd started (pid $(cat "$D/run/slurmdbd.bgpid"))"
fi

# ---------------------------------------------------------------- slurmctld, slurmd
if ours_alive slurmctld slurmctld; then
  say "slurmctld already running"
else
  setsid slurmctld -D >"$D/log/slurmctld.stdout" 2>&1 </dev/null &
  echo $! > "$D/run/slurmctld.bgpid"
  wait_until 60 scontrol ping || { tail -30 "$D/log/slurmctld.stdout"; die "slurmctld did not start"; }
  say "slurmctld started (pid $(cat "$D/run/slurmctld.bgpid"))"
fi
for n in $NAMES; do
  if ours_alive "slurmd.$n" slurmd; then
    say "slurmd $n already running"
  else
    setsid slurmd -D -N "$n" >"$D/log/slurmd.$n.stdout" 2>&1 </dev/null &
    echo $! > "$D/run/slurmd.$n.bgpid"
    say "slurmd $n started (pid $(cat "$D/run/slurmd.$n.bgpid"))"
  fi
done

# ---------------------------------------------------------------- wait until the nodes serve
nodes_up() {
  local s; s=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ -n "$s" ] && ! grep -v -E ' (idle|mixed|allocated)$' <<<"$s" | grep -q .
}
if ! wait_until 60 nodes_up; then
  sinfo -N -l; die "nodes did not come up; see $D/log"
fi
say "cluster ready"
sinfo
echo "export SLURM_CONF=$SLURM_CONF"

#!/usr/bin/env bash
# A real two-node Slurm cluster on this one host, for tests and for trying slurm/pretrain.sh:
#   scripts/slurm-cluster.sh start DIR [NODES]   # NODES=2: slurmctld + slurmd n1..nN + its own munged
#   export SLURM_CONF=DIR/slurm.conf             # then sbatch/squeue/scontrol talk to it
#   scripts/slurm-cluster.sh status DIR
#   scripts/slurm-cluster.sh stop DIR            # cancels its jobs, stops every daemon it started (pid files)
# Needs root and Debian's slurm-wlm + munge (scripts/setup.sh installs them: apt-get install slurm-wlm munge).
# Every node is this host (NodeAddr=127.0.0.1, one slurmd per node on its own port, CPUs=1 each), so an
# `sbatch -N2` job really runs two srun tasks through two slurmds. Like separate machines, each node gives a
# job its own /tmp and /dev/shm (job_container/tmpfs: mosaicml-streaming keeps per-node state in /dev/shm,
# and two "nodes" sharing one collide). Hence DIR, and every path a job uses, must be outside /tmp and
# /dev/shm (e.g. under /var/tmp), standing for the shared file system of a real cluster.
# Ports are picked free at start; state, spool, pid and log files live in DIR. munged gets its own key and
# socket in a private folder under /run (munged runs as user munge, which cannot enter root-only folders), so
# nothing in /etc is used or changed.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR [NODES]" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd="$1"
dir="$(mkdir -p "$2" && cd "$2" && pwd)"
nodes="${3:-2}"
conf="$dir/slurm.conf"

# A zombie counts as gone (PID 1 here may be slow to reap daemons that daemonized).
running() { [ -n "$1" ] && grep -qs '^State:[[:space:]]*[^Z]' "/proc/$1/status"; }
alive() { [ -f "$1" ] && running "$(cat "$1")"; }

port_free() { ! (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 30000))
    if port_free "$p" && ! grep -qs "Port=$p\b" "$conf.new"; then echo "$p"; return; fi
  done
  echo "no free port found" >&2; return 1
}

# Stop daemons by their pid files, all at once (each takes 1-2 s): SIGTERM, then SIGKILL after 15 s.
stop_pidfiles() {
  local f pids=()
  for f in "$@"; do
    if alive "$f"; then pids+=("$(cat "$f")"); kill "$(cat "$f")" 2>/dev/null || true; fi
  done
  for _ in $(seq 150); do
    local left=()
    for f in "${pids[@]}"; do running "$f" && left+=("$f"); done
    [ ${#left[@]} -eq 0 ] && break
    sleep 0.1
  done
  for f in "${pids[@]}"; do running "$f" && kill -9 "$f" 2>/dev/null; done
  rm -f "$@"
}

tree_pids() { # descendants of pid $1
  local c
  for c in $(pgrep -P "$1" || true); do echo "$c"; tree_pids "$c"; done
}

stop() {
  export SLURM_CONF="$conf"
  if alive "$dir/run/slurmctld.pid" && command -v scancel >/dev/null; then
    # Jobs first: slurmstepd (one per job step) outlives slurmd by design and would keep training running.
    scancel --quiet --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  # A slurmstepd of this cluster that survived scancel (its working directory is in DIR): kill it and the
  # processes it started.
  local p
  for p in $(pgrep -x slurmstepd || true); do
    case "$(readlink "/proc/$p/cwd" 2>/dev/null)/" in
      "$dir"/*) kill -9 "$p" $(tree_pids "$p") 2>/dev/null || true ;;
    esac
  done
  stop_pidfiles "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid"
  if [ -f "$dir/munge.path" ]; then
    stop_pidfiles "$(cat "$dir/munge.path")/munged.pid"
    rm -rf "$(cat "$dir/munge.path")" "$dir/munge.path"
  fi
}

status() {
  local rc=0 f
  local munge_pid="$(cat "$dir/munge.path" 2>/dev/null)/munged.pid"
  for f in "$dir/run/slurmctld.pid" "$dir"/run/slurmd-*.pid "$munge_pid"; do
    if alive "$f"; then
      echo "running  $(basename "$f" .pid) (pid $(cat "$f"))"
    else
      echo "stopped  $(basename "$f" .pid)"
      rc=1
    fi
  done
  [ $rc -eq 0 ] && SLURM_CONF="$conf" sinfo -N -o "%N %T %c" || true
  return $rc
}

start() {
  [ "$(id -u)" -eq 0 ] || { echo "$0 start needs root (slurmd runs jobs as their user)" >&2; exit 1; }
  for b in munged slurmctld slurmd sbatch; do
    command -v "$b" >/dev/null || { echo "$b not found: apt-get install slurm-wlm munge" >&2; exit 1; }
  done
  if alive "$dir/run/slurmctld.pid"; then echo "already running: $conf"; return 0; fi
  case "$dir/" in
    /tmp/* | /dev/shm/*)
      echo "DIR=$dir: must be outside /tmp and /dev/shm (jobs get private ones)" >&2
      exit 2
      ;;
  esac
  trap 'echo "[slurm-cluster] start failed; stopping what was started" >&2; stop' ERR

  local host m
  host="$(hostname -s)"
  mkdir -p "$dir"/{state,spool,run,log}
  m="$(mktemp -d /run/tessera-munge.XXXXXX)"
  echo "$m" >"$dir/munge.path"
  dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
  chmod 711 "$m" && chmod 400 "$m/munge.key" && chown -R munge:munge "$m"
  runuser -u munge -- munged --socket="$m/munge.socket" --key-file="$m/munge.key" --pid-file="$m/munged.pid" \
    --log-file="$m/munged.log" --seed-file="$m/munged.seed"

  : >"$conf.new"
  {
    echo "# written by scripts/slurm-cluster.sh: $nodes nodes on $host, state in $dir"
    echo "ClusterName=tessera"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmctldPort=$(free_port)"
  } >>"$conf.new"
  cat >>"$conf.new" <<EOF
# cred_expire: a requeued job waits this long (+1 s) before it may start again (default 120 s)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$m/munge.socket,cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# the main scheduler also wakes every second, so a requeued job starts as soon as its BeginTime passes
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# finished jobs stay visible to scontrol for 2 minutes (accounting is off: no sacct)
MinJobAge=120
KillWait=10
# a private /tmp and /dev/shm per job and node (job_container.conf); the plugin needs PrologFlags=Contain
JobContainerType=job_container/tmpfs
PrologFlags=Contain
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
EOF
  for i in $(seq "$nodes"); do
    echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=1 State=UNKNOWN" \
      >>"$conf.new"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$conf.new"
  # one BasePath per node: two nodes of one job on this host must not share their private /tmp, /dev/shm
  for i in $(seq "$nodes"); do
    mkdir -p "$dir/jobtmp/n$i"
    echo "NodeName=n$i AutoBasePath=true BasePath=$dir/jobtmp/n$i"
  done >"$dir/job_container.conf"
  mv "$conf.new" "$conf"

  # -i: ignore state left in $dir by an earlier run; stderr: a warning that PrologFlags=Contain is not for
  # pam_slurm_adopt here
  slurmctld -f "$conf" -i 2>>"$dir/log/slurmctld.log"
  for i in $(seq "$nodes"); do slurmd -f "$conf" -N "n$i"; done
  export SLURM_CONF="$conf"
  for _ in $(seq 150); do # up to 30 s for every node to register idle
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" -eq "$nodes" ] && break
    sleep 0.2
  done
  if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" -ne "$nodes" ]; then
    echo "[slurm-cluster] nodes did not come up idle; logs in $dir/log" >&2
    sinfo -N >&2 || true
    false
  fi
  trap - ERR
  echo "slurm cluster up ($nodes nodes): export SLURM_CONF=$conf"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac

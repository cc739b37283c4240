#!/bin/bash
# Tessera pretraining on Slurm: one torchrun launcher per node, PROCS_PER_NODE training processes each.
#
#   mkdir -p logs && sbatch --nodes 4 slurm/pretrain.sh configs/mae_vit_base_fmnist224.yaml --set seed=1
#   python -m launch.slurm CONFIG --nodes 4 --dry-run   # checks the config; prints sbatch command + script
#
# Submit from the repository root (the job runs in $SLURM_SUBMIT_DIR, or in $TESSERA_ROOT when set); the
# checkpoints (run.output_dir) and logs/ must be on a file system every node sees.
# Preemption and time limits: Slurm sends SIGUSR1 to this shell 120 s before the time limit (--signal below;
# `scancel --batch --signal=USR1 JOBID` does the same by hand). The shell forwards it to every training
# process through srun; they finish their optimizer step, write a checkpoint and exit. If the trainer reports
# "preempted", the job requeues itself (at most MAX_REQUEUES times) and the next run resumes from that
# checkpoint. A SIGTERM to this shell is passed on as USR1 (srun would answer a SIGTERM by killing its tasks).
# For preemption, have Slurm warn first (PreemptParameters=send_user_signal with a GraceTime, or
# --signal=B:USR1@T): a SIGTERM that Slurm sends to the whole step reaches srun too.
#
# Command-line options of sbatch override the #SBATCH lines below. logs/ must exist before sbatch (Slurm opens
# the output file before this script runs; launch.slurm creates it).
#SBATCH --job-name=tessera
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Uncomment and adapt to your cluster (one "#" is a directive, two disable it):
##SBATCH --partition=gpu
##SBATCH --gpus-per-node=8
##SBATCH --cpus-per-task=64
##SBATCH --exclusive

# ---- settings: edit here, or export them before sbatch (sbatch passes the environment on) ----
# training processes per node: one per GPU (Slurm's count when the job asked for GPUs)
PROCS_PER_NODE="${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
# the Python that has Tessera installed, relative to the repository root
PYTHON="${PYTHON:-.venv/bin/python}"
# seconds the launcher waits for its workers to checkpoint after a signal before it kills them; keep it below
# the lead time of --signal (120 s) minus one optimizer step
GRACE="${GRACE:-90}"
# stop requeueing after this many restarts of the same job (a job that is preempted forever is a bug)
MAX_REQUEUES="${MAX_REQUEUES:-10}"
# status files of each run go here, next to the job logs
LOG_DIR="${LOG_DIR:-logs}"
# rendezvous port on the first node, from the job id so that jobs sharing a node do not collide
RDZV_PORT="${RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

# Runs on the batch node before anything else, and in the environment srun passes to every node:
# load modules, activate conda, enter a container...
setup_env() {
  # module load cuda/12.4 nccl
  # source ~/miniforge3/bin/activate tessera
  :
}
# ---- end of settings ----

set -uo pipefail
say() { echo "[tessera-slurm $(date +%T)] $*"; }

die() { echo "error: $*" >&2; exit 2; }
usage="sbatch slurm/pretrain.sh CONFIG [--set key=value ...]"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; submit with: $usage"
[ $# -ge 1 ] || die "no config; usage: $usage"
cd "${TESSERA_ROOT:-$SLURM_SUBMIT_DIR}" || exit 2
[ -f pretrain/train.py ] || die "$(pwd) is not Tessera's repository: submit from its root or set TESSERA_ROOT"
setup_env
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found (set PYTHON or edit setup_env)"

restarts="${SLURM_RESTART_COUNT:-0}"
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# The address Slurm itself uses for the node (NodeAddr); node names need not resolve in DNS.
head_addr="$(scontrol show node "$head_node" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
head_addr="${head_addr:-$head_node}"
cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
# torchrun would set 1 thread per process; share the node's CPUs among its processes instead
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cpus / PROCS_PER_NODE > 0 ? cpus / PROCS_PER_NODE : 1))}"
export PYTHONUNBUFFERED=1
mkdir -p "$LOG_DIR"
# Rank 0 writes {"status": "preempted" | "finished" | "failed", "step": N, "signal": ...} here when it exits.
TESSERA_STATUS_FILE="$(cd "$LOG_DIR" && pwd)/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.restart${restarts}.status.json"
export TESSERA_STATUS_FILE
rm -f "$TESSERA_STATUS_FILE"

say "job $SLURM_JOB_ID restart $restarts: $SLURM_NNODES node(s) ($SLURM_JOB_NODELIST)" \
  "x $PROCS_PER_NODE process(es), rendezvous $head_addr:$RDZV_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS"
say "train: $*"

# The batch shell receives --signal=B:USR1 (and scancel --batch); pass it on to the step. srun forwards it to
# every process of the step on every node (torchrun forwards it again to its workers: the trainer's handler is
# idempotent). `wait` returns early when a trapped signal arrives, hence the loop.
got_signal=""
forward() {
  got_signal="$1"
  say "got SIG$1: asking the trainer to checkpoint and stop"
  # always USR1 to srun: srun passes USR1 on to its tasks, but answers SIGTERM by SIGKILLing them
  [ -n "${srun_pid:-}" ] && kill -s USR1 "$srun_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# --kill-on-bad-exit: a node that fails ends the step at once, instead of the others hanging in a collective.
srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" \
  --kill-on-bad-exit=1 \
  bash -c 'echo "[tessera-slurm] launcher $SLURM_PROCID on node $SLURMD_NODENAME"; exec "$@"' - \
  "$PYTHON" -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$PROCS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$head_addr:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$GRACE" \
  -m pretrain.train "$@" &
srun_pid=$!
[ -n "$got_signal" ] && kill -s USR1 "$srun_pid" 2>/dev/null # a signal that came before srun started
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
rc=$?

read_status='import json, sys; print(json.load(open(sys.argv[1]))["status"])'
status="$("$PYTHON" -c "$read_status" "$TESSERA_STATUS_FILE" 2>/dev/null)"
say "training step ended: srun exit $rc, trainer status ${status:-unknown} ($TESSERA_STATUS_FILE)," \
  "signal ${got_signal:-none}"
case "$status" in
  finished) exit 0 ;;
  failed) exit $((rc == 0 ? 1 : rc)) ;;
  preempted) ;;
  *) [ -n "$got_signal" ] || exit "$rc" ;; # no status (trainer killed): requeue only if we were signalled
esac
if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
  say "not requeueing: restart $restarts reached MAX_REQUEUES=$MAX_REQUEUES; resubmit to continue"
  exit 75
fi
say "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from the latest checkpoint"
trap '' TERM USR1 # the requeue ends this shell
scontrol requeue "$SLURM_JOB_ID" || { say "scontrol requeue failed; resubmit to continue"; exit 75; }
exit 0

#!/bin/bash
# sd35dist job 'train' of recipe 'sd35l-full-fsdp2' on profile 'h100x8'.
# Rendered by `sd35dist submit`; submit it with `sbatch <this file>`.
# Run directory: /shared/runs/golden-run (frozen recipe: /shared/runs/golden-run/recipe.yaml)
#SBATCH --job-name=sd35l-full-fsdp2-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --partition=gpu
#SBATCH --constraint=h100
#SBATCH --exclusive
#SBATCH --output=/shared/runs/golden-run/logs/%j.out
#SBATCH --error=/shared/runs/golden-run/logs/%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail

# lifecycle: docs/lifecycle.md (first: Slurm may send the time-limit warning up to a minute early)
PREEMPT_REQUEST=/shared/runs/golden-run/PREEMPT
rm -f "$PREEMPT_REQUEST" /shared/runs/golden-run/MISTAKE  # a requeued job starts without the previous run's files
TIME_LIMIT_WARNED=0
trap 'TIME_LIMIT_WARNED=1; echo "sd35dist: time-limit warning: asking the ranks to save" >&2; touch "$PREEMPT_REQUEST"' USR1
trap 'echo "sd35dist: SIGTERM from Slurm: the ranks save if it fits, then stop" >&2' TERM

echo 'sd35dist: fsdp2: FSDP over 8 ranks on 1 node(s) (mesh [8])'
# setup from the profile
source "$HOME/venvs/sd35dist/bin/activate"
# environment (non-secret values from the profile)
export OMP_NUM_THREADS=12
export HF_HUB_OFFLINE=1
export SD35DIST_RUN_DIR=/shared/runs/golden-run
export SD35DIST_SIGNAL_GRACE_S=300
# GPU environment (the profile's gpu_env:, docs/gpu.md), each with why
# activation shapes change with every aspect bucket: growable segments instead of cached blocks per shape, so fragmentation cannot run a job that fits out of memory
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# a collective waits at most this long for a peer (the first step compiles and loads weights for minutes: longer than torch's 10-minute default)
export SD35DIST_COLLECTIVE_TIMEOUT_S=1800
# a failed or timed-out NCCL collective ends the rank, so torchrun restarts the workers (launch.max_restarts) instead of the job hanging until its time limit
export TORCH_NCCL_ASYNC_ERROR_HANDLING=3
# on a timeout each rank dumps its last collectives (torch's flight recorder) ...
export TORCH_NCCL_DUMP_ON_TIMEOUT=1
# ... into the run's logs, one file per rank: which rank was stuck in which collective
export TORCH_FR_DUMP_TEMP_FILE="$SD35DIST_RUN_DIR/logs/nccl-trace-rank"
# NCCL's own warnings (a link down, a fallback to sockets) reach the job log
export NCCL_DEBUG=WARN
# secrets: passed by name from the submitting environment; values are never written here
[ -n "${AWS_ACCESS_KEY_ID:-}" ] || echo "sd35dist: warning: AWS_ACCESS_KEY_ID is not set in the job environment" >&2
[ -n "${AWS_SECRET_ACCESS_KEY:-}" ] || echo "sd35dist: warning: AWS_SECRET_ACCESS_KEY is not set in the job environment" >&2
[ -n "${WANDB_API_KEY:-}" ] || echo "sd35dist: warning: WANDB_API_KEY is not set in the job environment" >&2
command -v sd35dist >/dev/null || { echo "sd35dist: the sd35dist command is not on PATH: activate the project's environment in the profile's setup.lines" >&2; exit 2; }
# rendezvous on the first node, by the address Slurm knows (node names need not resolve)
RDZV_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
RDZV_ADDR=$(scontrol show node "$RDZV_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | sed -n 1p)
export SD35DIST_RDZV_HOST="${RDZV_ADDR:-$RDZV_NODE}"
# a port of its own per job, so jobs sharing the first node never meet in one c10d store
export SD35DIST_RDZV_PORT=$((29500 + SLURM_JOB_ID % 1000))
echo "sd35dist: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_JOB_NODELIST rendezvous $SD35DIST_RDZV_HOST:$SD35DIST_RDZV_PORT"

# one torchrun agent per node; per-node values (SLURM_NODEID…) reach it through srun's environment
srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=96 \
    sd35dist torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node=8 \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$SD35DIST_RDZV_HOST:$SD35DIST_RDZV_PORT" \
    --max-restarts=3 \
    --start-method=forkserver \
    -m sd35dist train \
    --recipe /shared/runs/golden-run/recipe.yaml \
    --run-dir /shared/runs/golden-run &

STEP_PID=$!
# a trapped signal ends `wait` early while the step still runs: wait until it has exited
while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID" || true; done
STEP_STATUS=0; wait "$STEP_PID" || STEP_STATUS=$?
if ((TIME_LIMIT_WARNED)) && ((STEP_STATUS == 0)); then
    echo "sd35dist: the ranks saved before the time limit; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
if [ -e "$SD35DIST_RUN_DIR/MISTAKE" ]; then STEP_STATUS=2; fi  # not srun's signal for the other nodes
exit "$STEP_STATUS"

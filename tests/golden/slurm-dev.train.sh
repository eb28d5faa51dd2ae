#!/bin/bash
# sd35dist job 'train' of recipe 'tiny' on profile 'slurm-dev'.
# Rendered by `sd35dist submit`; submit it with `sbatch <this file>`.
# Run directory: /shared/runs/golden-run (frozen recipe: /shared/runs/golden-run/recipe.yaml)
#SBATCH --job-name=tiny-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --time=00:30:00
#SBATCH --partition=dev
#SBATCH --output=/shared/runs/golden-run/logs/%j.out
#SBATCH --error=/shared/runs/golden-run/logs/%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@30

set -euo pipefail

# environment (non-secret values from the profile)
export OMP_NUM_THREADS=1
export SD35DIST_RUN_DIR=/shared/runs/golden-run
# secrets: passed by name from the submitting environment; values are never written here
[ -n "${AWS_ACCESS_KEY_ID:-}" ] || echo "sd35dist: warning: AWS_ACCESS_KEY_ID is not set in the job environment" >&2
[ -n "${AWS_SECRET_ACCESS_KEY:-}" ] || echo "sd35dist: warning: AWS_SECRET_ACCESS_KEY is not set in the job environment" >&2
[ -n "${WANDB_API_KEY:-}" ] || echo "sd35dist: warning: WANDB_API_KEY is not set in the job environment" >&2
command -v torchrun >/dev/null || { echo "sd35dist: torchrun not found on PATH: activate the project's environment in the profile's setup.lines" >&2; exit 2; }
# rendezvous on the first node, by the address Slurm knows (node names need not resolve)
RDZV_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
RDZV_ADDR=$(scontrol show node "$RDZV_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | sed -n 1p)
export SD35DIST_RDZV_HOST="${RDZV_ADDR:-$RDZV_NODE}"
echo "sd35dist: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_JOB_NODELIST rendezvous $SD35DIST_RDZV_HOST:29511"

# one torchrun agent per node; per-node values (SLURM_NODEID…) reach it through srun's environment
srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=1 \
    torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node=1 \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$SD35DIST_RDZV_HOST:29511" \
    -m sd35dist train \
    --recipe /shared/runs/golden-run/recipe.yaml \
    --run-dir /shared/runs/golden-run

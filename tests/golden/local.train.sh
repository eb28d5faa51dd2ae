#!/bin/bash
# sd35dist job 'train' of recipe 'tiny' on profile 'local'.
# Rendered by `sd35dist submit`; run it with `bash <this file>`.
# Run directory: /shared/runs/golden-run (frozen recipe: /shared/runs/golden-run/recipe.yaml)

set -euo pipefail

echo 'sd35dist: fsdp2: FSDP over 2 ranks on 1 node(s) (mesh [2])'
# environment (non-secret values from the profile)
export OMP_NUM_THREADS=1
export SD35DIST_RUN_DIR=/shared/runs/golden-run
command -v sd35dist >/dev/null || { echo "sd35dist: the sd35dist command is not on PATH: activate the project's environment in the profile's setup.lines" >&2; exit 2; }

exec sd35dist torchrun \
    --standalone \
    --nnodes=1 \
    --nproc-per-node=2 \
    --max-restarts=3 \
    --start-method=forkserver \
    -m sd35dist train \
    --recipe /shared/runs/golden-run/recipe.yaml \
    --run-dir /shared/runs/golden-run

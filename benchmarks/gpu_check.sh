#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): diffusers loop vs our step eager, compiled, compiled + FP8, at
# SD3.5 Large width on one GPU, in under 8 minutes on an H100. `--smoke` runs it on CPU at tiny size.
#
#   bash benchmarks/gpu_check.sh [--smoke] [gpu_check.py options]
#
# Python: $PYTHON, else the checkout's .venv, else python3. A GPU machine that has torch (and transformers,
# accelerate, peft, safetensors) but not the rest gets it from wheels in .whl/ at the checkout's root,
# installed into a folder of its own (nothing of the machine's is replaced): fetch them on a machine with
# pip access with `bash benchmarks/gpu_wheels.sh`, then carry .whl/ along with the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
NEEDED="import diffusers, torchao, pydantic, optimi, yaml, setproctitle"
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: $PY lacks diffusers/torchao/pydantic/torch-optimi and there is no .whl/: run benchmarks/gpu_wheels.sh where pip works and carry .whl/" >&2
        exit 2
    fi
    SITE=${GPU_CHECK_SITE:-/tmp/sd35dist-gpu-check-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "$NEEDED"
fi
# Warm ranks (sd35dist/jobs/warm_ranks.py, the profiles' default) fork from a process that imported the
# libraries: a rank must still be able to use CUDA.
"$PY" -m sd35dist torchrun --standalone --nproc-per-node=1 --start-method=forkserver -m benchmarks.warm_rank_cuda
exec "$PY" benchmarks/gpu_check.py "$@"

#!/usr/bin/env bash
# Fetch, on a machine where pip reaches the package index, the wheels benchmarks/gpu_check.sh needs on a GPU
# machine whose Python already has torch, transformers, accelerate, peft, safetensors, numpy, PyYAML and
# fsspec: our pins (requirements.txt) of the rest, built for that machine (default CPython 3.12, x86-64 Linux).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]      # writes .whl/ at the checkout's root (git ignores it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PY=${PYTHON:-python3}
NAMES='diffusers|torchao|torch-optimi|pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions|importlib_metadata|setproctitle'
mapfile -t PINS < <(grep -E "^($NAMES)==" requirements.txt)
if [ "${#PINS[@]}" -ne 10 ]; then
    echo "gpu_wheels: expected 10 pins in requirements.txt, found: ${PINS[*]}" >&2
    exit 2
fi
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${PINS[@]}"
ls -l .whl

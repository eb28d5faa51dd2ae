"""`benchmarks/gpu_check.sh --smoke`: the GPU check's code on CPU at tiny size, so it is known to run
before a GPU is at hand (the numbers it prints on CPU mean nothing)."""

from __future__ import annotations

import subprocess

import pytest

from tests.cli_runs import PROJECT, venv_env

pytestmark = pytest.mark.process


def test_gpu_check_smoke_runs_every_loop_and_prints_the_table():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], capture_output=True, text=True, cwd=PROJECT,
                          env=venv_env(OMP_NUM_THREADS="2"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| loop")]
    names = ["diffusers example loop", "ours eager", "ours compiled", "ours compiled + fp8 tensorwise"]
    assert [row.split(" | ")[0][2:].split(" (")[0] for row in rows] == names, rows
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert float(cells[1]) > 0, row  # img/s
        assert float(cells[5]) > 0, row  # the plan's peak beside the (CPU: absent) measured one
    assert "compiled vs eager, last loss" in proc.stdout and "fp8 vs eager, last loss" in proc.stdout
    # The compiled loop computes what eager does (aot_eager on CPU: the same kernels, traced).
    compiled = next(line for line in proc.stdout.splitlines() if line.startswith("# compiled vs eager"))
    numbers = compiled.split(": ")[1].split(" vs ")
    assert float(numbers[0]) == pytest.approx(float(numbers[1]), rel=1e-3)

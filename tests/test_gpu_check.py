"""`benchmarks/gpu_check.sh --smoke`: the GPU check's code on CPU at tiny size, so it is known to run
before a GPU is at hand (the speeds it prints on CPU mean nothing). It is also the CPU proof that the
fast path's parts compose: one FSDP2 rank, every block checkpointed and compiled with AOT autograd (the
graphs inductor gets; backend aot_eager), the middle block's Linears fp8 tensorwise (emulated). `--smoke`
leaves out the compiled loop without fp8: the same code (tests/test_fast_path_dist.py compares compiled
with eager under every strategy)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.cli_runs import PROJECT, venv_env

pytestmark = pytest.mark.process

FP8_LOSS_RTOL = 0.005
"""fp8 against bf16 eager, as in tests/test_fast_path_dist.py (measured 0.01 %)."""


def _comment(stdout: str, start: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(start)).split(": ", 1)[1]


def test_gpu_check_smoke_runs_every_loop_and_compiled_fp8_trains_like_eager():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], capture_output=True, text=True, cwd=PROJECT,
                          env=venv_env(OMP_NUM_THREADS="2"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check: warm rank: no CUDA here; forked from the fork server and ran on CPU" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| loop")]
    names = ["diffusers example loop", "ours eager", "ours compiled + fp8 tensorwise"]
    assert [row.split(" | ")[0][2:].split(" (")[0] for row in rows] == names, rows
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert float(cells[1]) > 0, row  # img/s
        assert float(cells[5]) > 0, row  # the plan's peak beside the (CPU: absent) measured one
    # The compiled loop made dynamo graphs and AOT autograd traced them (forward and backward).
    graphs = re.findall(r"(\w+) (\d+)/(\d+)", _comment(proc.stdout, "# graphs per loop"))
    assert [loop for loop, _, _ in graphs] == ["fp8"], graphs
    assert all(int(dynamo) > 0 and int(aot) > 0 for _, dynamo, aot in graphs), graphs
    # Compiled + fp8 trains like eager bf16 within fp8's tolerance.
    ours, eager = map(float, _comment(proc.stdout, "# fp8 vs eager").split(" vs "))
    assert ours == pytest.approx(eager, rel=FP8_LOSS_RTOL)

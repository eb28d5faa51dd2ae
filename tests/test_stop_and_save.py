"""Stopping a running `sd35dist train` (2 gloo ranks under torchrun, no Slurm): the PREEMPT file,
a SIGTERM to the ranks, and the warning when a save does not fit the grace Slurm gives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sd35dist.checkpoint.layout import CheckpointDir
from sd35dist.runtime.save_budget import SAVE_ESTIMATE_FILE, read_save_estimate
from tests.cli_runs import PROJECT, venv_env
from tests.rank_runs import WARM_TORCHRUN, rank_processes
from tests.train_runs import losses, train, train_recipe

pytestmark = pytest.mark.dist


def start_training(recipe: Path, run_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*WARM_TORCHRUN, "--standalone", "--nproc-per-node=2",
         "-m", "sd35dist", "train", "--recipe", str(recipe), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=PROJECT,
        env={**(env or venv_env()), "OMP_NUM_THREADS": "1"},
    )


def wait_for_steps(run_dir: Path, count: int, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    metrics = run_dir / "metrics-rank00000.jsonl"
    deadline = time.monotonic() + timeout_s
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= count):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "training did not reach the step"
        time.sleep(0.2)


def settings(**extra):
    return {"max_train_steps": 200, "checkpointing_steps": 100, "gradient_checkpointing": False,
            "ema": {"enabled": False}, **extra}


def test_sigterm_outside_slurm_is_a_cancel_that_saves_and_a_save_longer_than_the_grace_is_warned(cache, tmp_path):
    """One run for two things a user sees. A SIGTERM to the ranks (no Slurm) is a cancel: they save the step
    they are at and exit 0, with no requeue. Before it, with a signal grace (0.001 s) shorter than a save,
    the first timed save (step 2) warned once and recorded its measured time for the next submission."""
    out = tmp_path / "out"
    recipe = train_recipe(tmp_path / "r.yaml", cache, out, **settings(checkpointing_steps=2))
    proc = start_training(recipe, tmp_path / "run", env=venv_env(SD35DIST_SIGNAL_GRACE_S="0.001"))
    wait_for_steps(tmp_path / "run", 3, proc)
    for pid in rank_processes(proc.pid):
        os.kill(pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    cancelled = [line for line in output.splitlines() if "cancelled (SIGTERM): saved step" in line]
    assert cancelled, output[-3000:]
    assert "requeue" not in output.lower()
    step = int(cancelled[0].split("saved step ")[1].split()[0].rstrip(";"))
    latest = CheckpointDir(out).latest()
    assert step >= 3 and latest == CheckpointDir(out).path(step) and (latest / "COMPLETE").exists()
    assert max(losses(tmp_path / "run")) == step, "no step runs after the save"

    warnings = [line for line in output.splitlines()
                if "slurm.signal_grace_s (0.001 s) is shorter than a checkpoint save plus a step" in line]
    assert len(warnings) == 1, "warned once, after the first save was timed"
    estimate = read_save_estimate(str(out))
    assert estimate is not None and estimate.save_s > 0 and estimate.step_s > 0
    assert estimate.source.startswith("measured at step")
    assert json.loads((out / SAVE_ESTIMATE_FILE).read_text())["save_s"] == estimate.save_s


def test_the_preempt_file_stops_at_the_next_step_boundary_even_while_validation_renders(cache, tmp_path):
    """The time-limit request (the PREEMPT file, as the batch shell writes it) is there while the at-start
    round renders (3 pairs on 2 ranks, so one rank runs a placeholder): the round finishes on both ranks,
    one step runs, the ranks save it and stop, exit 0. (Every rank looks for the file at every step
    boundary, trainer/preemption.py's PreemptionWatch.seen_here, so one written later is met the same way.)"""
    from tests.validation_check import cache_validation_prompts

    out, run = tmp_path / "out", tmp_path / "run"
    recipe = train_recipe(tmp_path / "r.yaml", cache, out, **settings())
    cache_validation_prompts(recipe)  # the recipe gains a validation section with at_start: true
    run.mkdir()
    (run / "PREEMPT").write_text("")
    output = train(recipe, run).stdout
    assert "stopped (PREEMPT file): saved step 1;" in output, output[-3000:]
    assert (run / "validation" / "step-000000" / "grid.png").is_file(), "the round was not cut short"
    assert max(losses(run)) == 1 and CheckpointDir(out).latest() == CheckpointDir(out).path(1)

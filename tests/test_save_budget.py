"""Does a checkpoint save fit the time Slurm gives it? Preflight measures, submit and the job warn."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from sd35dist.jobs.save_probe import checkpoint_bytes_per_parameter
from sd35dist.runtime.job_env import JobEnvironment
from sd35dist.runtime.save_budget import (
    SAVE_ESTIMATE_FILE,
    SaveBudget,
    SaveEstimate,
    grace_warnings,
    read_save_estimate,
    write_save_estimate,
)
from tests.cli_runs import PROJECT, venv_env
from tests.preflight_runs import run_preflight, write_recipe


@pytest.mark.unit
def test_warnings_name_the_deadline_a_save_misses():
    assert grace_warnings(signal_grace_s=300, kill_wait_s=30, save_s=20, step_s=5) == []
    grace, = grace_warnings(signal_grace_s=30, kill_wait_s=None, save_s=25, step_s=8)
    assert "slurm.signal_grace_s (30 s) is shorter than a checkpoint save plus a step (~33 s)" in grace
    kill, = grace_warnings(signal_grace_s=None, kill_wait_s=30, save_s=45, step_s=None)
    assert "KillWait (30 s) is shorter than a checkpoint save (~45 s)" in kill
    assert len(grace_warnings(signal_grace_s=10, kill_wait_s=10, save_s=45, step_s=1)) == 2
    assert grace_warnings(signal_grace_s=1, kill_wait_s=1, save_s=None, step_s=1) == [], "nothing known, nothing said"


@pytest.mark.unit
def test_the_estimate_round_trips_and_the_last_run_wins(tmp_path):
    assert read_save_estimate(str(tmp_path)) is None
    write_save_estimate(str(tmp_path), SaveEstimate(12.5, None, "preflight: 1.00 GB per rank at 80 MB/s"))
    assert read_save_estimate(str(tmp_path)) == SaveEstimate(12.5, None, "preflight: 1.00 GB per rank at 80 MB/s")
    assert read_save_estimate("s3://bucket/out") is None, "only a local output dir is read"
    budget = SaveBudget.for_this_job(str(tmp_path), last_save_s=40.0,
                                    job=JobEnvironment.read({"SD35DIST_SIGNAL_GRACE_S": "30"}))
    assert budget.estimate.save_s == 40.0 and budget.kill_wait_s is None
    assert len(budget.warnings(step_s=None)) == 1
    assert budget.measured(3.0, 0.5, step=8) is True and budget.measured(3.1, 0.5, step=16) is False
    assert read_save_estimate(str(tmp_path)).source == "measured at step 16"
    assert budget.warnings(step_s=0.5) == []
    (tmp_path / SAVE_ESTIMATE_FILE).write_text("{not json")
    assert read_save_estimate(str(tmp_path)) is None


@pytest.mark.unit
def test_a_checkpoint_holds_what_the_optimizer_keeps():
    assert checkpoint_bytes_per_parameter("adamw", ema=False) == 12
    assert checkpoint_bytes_per_parameter("adamw", ema=True) == 16
    assert checkpoint_bytes_per_parameter("adamw_bf16", ema=False) == 8


@pytest.mark.process
def test_submit_warns_when_the_last_measured_save_exceeds_the_grace(tmp_path):
    recipe = {"name": "tiny", "model": {"pretrained": str(tmp_path / "model")},
              "data": {"cache_url": str(tmp_path / "cache"), "datasets": [{"id": "images", "source": str(tmp_path)}]},
              "output": {"dir": str(tmp_path / "out")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def dry_run() -> str:
        return subprocess.run([sys.executable, "-m", "sd35dist", "submit", "--profile", "slurm-dev", "--recipe",
                               str(path), "--dry-run"], capture_output=True, text=True, cwd=PROJECT,
                              env=venv_env(PATH="/usr/bin:/bin"), check=True).stderr

    assert "signal_grace_s" not in dry_run()
    write_save_estimate(str(tmp_path / "out"), SaveEstimate(95.0, 2.0, "measured at step 400"))
    warning = [line for line in dry_run().splitlines() if line.startswith("warning:")]
    assert warning == ["warning: slurm.signal_grace_s (30 s) is shorter than a checkpoint save plus a step (~97 s): "
                       "the save at the time-limit warning will not finish and the run goes back to its last periodic "
                       "checkpoint; raise slurm.signal_grace_s in the profile (save time measured at step 400)"]


@pytest.mark.dist
def test_preflight_measures_the_output_dir_and_records_a_save_estimate(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "tiny-sd3")
    (tmp_path / "cache").mkdir()
    run = run_preflight(write_recipe(tmp_path, str(tmp_path / "cache"), tmp_path / "out"), tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    save = run.report["checkpoint_save"]
    assert save["estimated"] is True and save["write_mbps"] > 0 and save["parameters"] > 1000
    train = yaml.safe_load((PROJECT / "recipes" / "tiny.yaml").read_text())["train"]
    per_parameter = checkpoint_bytes_per_parameter(train.get("optimizer", "adamw"), train["ema"]["enabled"])
    assert save["bytes_per_rank"] == save["parameters"] * per_parameter // 2, "sharded over both ranks"
    estimate = read_save_estimate(str(tmp_path / "out"))
    assert estimate is not None and estimate.save_s == save["save_s"] and estimate.source.startswith("preflight:")
    assert "checkpoint  ~" in run.stdout
    assert not list((tmp_path / "out").glob(".save-probe*")), "the probe files are removed"

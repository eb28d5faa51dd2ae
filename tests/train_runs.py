"""`sd35dist train` as the tests run it: a recipe over a cache, 2 gloo ranks under torchrun, the
per-step losses a run logged, and an export read back through diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.cli_runs import PROJECT, venv_env
from tests.rank_runs import WARM_TORCHRUN


def train_recipe(path: Path, cache: tuple[Path, Path], output: Path, **train) -> Path:
    model, cache_dir = cache
    settings = {"train_batch_size": 2, "max_train_steps": 6, "learning_rate": 1e-3, "mixed_precision": "fp32",
                "gradient_checkpointing": True, "checkpointing_steps": 3, "checkpoints_total_limit": 2,
                "caption_dropout_probability": 0.2, "ema": {"enabled": True, "decay": 0.9}, **train}
    recipe = {"name": "t", "seed": 3, "model": {"pretrained": str(model)}, "data": {"cache_url": str(cache_dir)},
              "parallel": {"strategy": "fsdp2"}, "train": settings, "logging": {"report_to": "none"},
              "output": {"dir": str(output)}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(recipe: Path, run_dir: Path, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*WARM_TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
         "-m", "sd35dist", "train", "--recipe", str(recipe), "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=PROJECT, env={**(env or venv_env()), "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_in_one_group(*runs: tuple[Path, Path], timeout: float = 900) -> dict[Path, str]:
    """Several runs, (recipe, run directory) each, one after another on 2 gloo ranks in ONE torchrun
    (tests/trainings_check.py; DeepSpeed on its CPU accelerator): a later run may resume from an earlier
    one's checkpoint, and the N runs cost one start-up instead of N. Every run must end "done" on every
    rank; returns rank 0's output of each run, by run directory. A module keeps `train` (the CLI, a
    torchrun of its own) where it tests the command itself."""
    from tests.trainings_check import run_trainings

    first = runs[0][1]
    results = run_trainings(first.parent / f"{first.name}-trainings.json", *runs, timeout=timeout)
    assert [Path(r["run_dir"]) for r in results] == [run_dir for _, run_dir in runs], results
    assert all(set(r["outcomes"]) == {"done"} for r in results), [(r["run_dir"], r["outcomes"]) for r in results]
    return {Path(r["run_dir"]): r["stdout"] for r in results}


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics-rank00000.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def learning_rates(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics-rank00000.jsonl").read_text().splitlines()
    return {r["step"]: r["lr"] for r in map(json.loads, lines)}


def export(checkpoint: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    proc = subprocess.run([sys.executable, "-m", "sd35dist", "export", str(checkpoint), "--out", str(out),
                           "--dtype", "fp32", *flags], capture_output=True, text=True, cwd=PROJECT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(out).state_dict()


def train_refused(recipe: Path, run_dir: Path) -> str:
    """A run the ranks must refuse before training, started as a profile's script starts it (sd35dist
    torchrun with restarts on): exit status 2, one `error:` line (returned), no restart."""
    proc = subprocess.run(
        [*WARM_TORCHRUN, "--standalone", "--nproc-per-node=2", "--max-restarts=3",
         "-m", "sd35dist", "train", "--recipe", str(recipe), "--run-dir", str(run_dir)],
        capture_output=True, text=True, cwd=PROJECT, env=venv_env(OMP_NUM_THREADS="1"), timeout=600)
    everything = proc.stdout + proc.stderr
    errors = [line for line in everything.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, everything[-4000:]
    assert "Traceback" not in everything and "will restart worker group" not in everything, everything[-4000:]
    return errors[0]


class RunsCode:
    """Unpickling this creates a file: the side effect a crafted checkpoint would have."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

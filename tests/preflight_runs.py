"""`sd35dist preflight` as the tests run it: the embedded tiny recipe with a test's paths, 2 ranks under
torchrun, and the report and failure lines they leave."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.cli_runs import PROJECT, venv_env
from tests.rank_runs import WARM_TORCHRUN

RUN_TIMEOUT_S = 180


def write_recipe(tmp_path: Path, cache_url: str, output_dir: Path, storage_options: dict | None = None) -> Path:
    """The embedded tiny recipe with this test's paths."""
    recipe = yaml.safe_load((PROJECT / "recipes" / "tiny.yaml").read_text())
    recipe["model"]["pretrained"] = str(tmp_path / "tiny-sd3")
    recipe["data"] = {"cache_url": cache_url, **({"storage_options": storage_options} if storage_options else {})}
    recipe["output"]["dir"] = str(output_dir)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class PreflightRun:
    def __init__(self, proc: subprocess.CompletedProcess[str], run_dir: Path) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.report_path = run_dir / "preflight.json"

    @property
    def report(self) -> dict:
        return json.loads(self.report_path.read_text())

    @property
    def failure_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("preflight failed on")]


def run_preflight(recipe: Path, run_dir: Path, nproc: int = 2, **env: str) -> PreflightRun:
    proc = subprocess.run(
        [
            *WARM_TORCHRUN, "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
            "-m", "sd35dist", "preflight", "--recipe", str(recipe), "--run-dir", str(run_dir),
        ],
        capture_output=True, text=True, cwd=PROJECT, timeout=RUN_TIMEOUT_S,
        env=venv_env(OMP_NUM_THREADS="1", **env),
    )
    return PreflightRun(proc, run_dir)

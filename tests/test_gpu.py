"""On a machine with CUDA: the same jobs take NCCL and report the GPUs (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from tests.preflight_runs import run_preflight, write_recipe

pytestmark = pytest.mark.gpu


def test_preflight_uses_nccl_and_reports_every_gpu(tmp_path):
    (tmp_path / "cache").mkdir()
    recipe = write_recipe(tmp_path, str(tmp_path / "cache"), tmp_path / "out")
    run = run_preflight(recipe, tmp_path / "run", nproc=torch.cuda.device_count())  # one rank per GPU
    assert run.returncode == 0, run.stderr[-2000:]
    report = run.report
    assert report["backend"] == "nccl"
    assert report["allreduce"]["ok"] is True
    gpus = [r["gpu"] for r in report["ranks"]]
    assert all(g is not None and g["total_bytes"] > 0 for g in gpus)
    assert {g["node_gpu_count"] for g in gpus} == {torch.cuda.device_count()}

"""`make demo`'s program end to end, in a scratch working directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import venv_env

pytestmark = pytest.mark.dist


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sd35dist.demo"], capture_output=True, text=True, cwd=tmp_path,
                          env=venv_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for step in ("--job preflight", "--job cache", "train.max_train_steps=4", "export"):
        assert step in out
    assert out.count("ended: COMPLETED") == 4
    assert "resumed from" in out and "step-00000004" in out
    demo = tmp_path / "runs" / "demo"
    assert (demo / "cache" / "manifest.json").is_file()
    assert (demo / "output" / "checkpoints" / "step-00000008" / "COMPLETE").is_file()
    assert (demo / "export" / "transformer" / "config.json").is_file()
    with Image.open(demo / "sample.png") as image:
        assert image.size == (64, 64)
    assert "demo finished" in out
    assert (demo / "export" / "tiny-sd3-ft.safetensors").is_file() and "‖Δ‖/‖W_base‖" in out
    assert (demo / "export" / "change-by-block.png").read_bytes()[:4] == b"\x89PNG"

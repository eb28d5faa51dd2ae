"""`make demo`'s program end to end, in a scratch working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.cli_runs import venv_env

pytestmark = pytest.mark.dist


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sd35dist.demo"], capture_output=True, text=True, cwd=tmp_path,
                          env=venv_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for step in ("--job preflight", "--job cache", "train.max_train_steps=16", "export"):
        assert step in out
    assert out.count("ended: COMPLETED") == 6, "preflight, cache, train twice, sweep, and the LoRA leg's train"
    assert "resumed from" in out and "step-00000016" in out
    demo = tmp_path / "runs" / "demo"
    with Image.open(demo / "output" / "sweep" / "grid.png") as sweep:  # steps 16 and 32 x 2 seeds, 3 prompts
        assert sweep.width > 4 * 64 and sweep.height > 3 * 64
    assert (demo / "cache" / "manifest.json").is_file()
    assert (demo / "output" / "checkpoints" / "step-00000032" / "COMPLETE").is_file()
    assert (demo / "export" / "transformer" / "config.json").is_file()
    with Image.open(demo / "sample.png") as image:
        assert image.size == (64, 64)
    assert (demo / "export-lora" / "pytorch_lora_weights.safetensors").is_file()
    with Image.open(demo / "sample-lora.png") as image:
        assert image.size == (64, 64)
    assert "demo finished" in out
    comfy = [line.split("<-")[1].split(" (")[0].strip() for line in out.splitlines() if "ComfyUI/models/" in line]
    assert len(comfy) == 2 and all(Path(path).is_file() for path in comfy), "the ComfyUI-ready files it names exist"
    # The demo shows training: grids at the start, the stop and the end, one report, a falling loss.
    grids = [line.split()[-1] for line in out.splitlines() if line.strip().startswith("validation grid, step")]
    assert [Path(g).parent.name for g in grids] == ["step-000000", "step-000016", "step-000032"]
    with Image.open(grids[0]) as first, Image.open(grids[-1]) as last:
        assert first.size == last.size and first.width > 4 * 64 and first.height > 3 * 64  # 2 weights x 2 seeds, 3 prompts
    assert (demo / "report" / "report.html").stat().st_size > 10_000
    assert (demo / "report" / "plots" / "loss.png").is_file()
    assert "at the start ->" in out and "submitit INFO" not in out
    assert (demo / "export" / "tiny-sd3-ft.safetensors").is_file() and "‖Δ‖/‖W_base‖" in out
    assert (demo / "export" / "change-by-block.png").read_bytes()[:4] == b"\x89PNG"

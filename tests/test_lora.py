"""LoRA fine-tunes (`train.lora`) with fsdp2 and zero2 on the tiny SD3, 2 CPU ranks: the adapters
train and the base stays put, checkpoints hold only the adapters, resume is exact (and FSDP2
resumes on another world size), and the exports load in diffusers (and map onto ComfyUI).

One straight run and one stopped-and-resumed run per strategy (module-scoped fixtures) serve
every assert; the bf16 run checks adapters move in bf16 compute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sd35dist.checkpoint.layout import CheckpointDir
from tests.conftest import PROJECT
from tests.test_cache_build import tiny_model  # noqa: F401
from tests.test_train import cache, losses, train, train_recipe  # noqa: F401

pytestmark = pytest.mark.dist

LORA = {"rank": 4, "alpha": 8.0, "targets": "attention_ff"}
# Accumulation and clipping as in full fine-tunes; 4 steps, a checkpoint every 2.
SETTINGS = {"max_train_steps": 4, "checkpointing_steps": 2, "gradient_accumulation_steps": 2, "max_grad_norm": 0.05,
            "lora": LORA}
TOLERANCE = 1e-5
"""fp32 outputs of the diffusers-loaded LoRA vs the trained model: the same math in another order."""


@pytest.fixture(scope="module", autouse=True)
def deepspeed_on_cpu():
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "sd35dist" / "torch_extensions"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DS_ACCELERATOR", "cpu")
        patch.setenv("TORCH_EXTENSIONS_DIR", extensions)
        yield


def lora_recipe(path: Path, cache: tuple[Path, Path], output: Path, strategy: str, **train) -> Path:  # noqa: F811
    train_recipe(path, cache, output, **{**SETTINGS, **train})
    recipe = yaml.safe_load(path.read_text())
    recipe["parallel"]["strategy"] = strategy
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def export(checkpoint: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sd35dist", "export", str(checkpoint), "--out", str(out), *flags],
                          capture_output=True, text=True, cwd=PROJECT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=["fsdp2", "zero2"])
def runs(request, tmp_path_factory, cache) -> tuple[str, Path]:  # noqa: F811
    """A straight 4-step run (root/straight) and a 2 + 2 run (root/resumed) of one strategy."""
    strategy = request.param
    root = tmp_path_factory.mktemp(f"lora-{strategy}")
    train(lora_recipe(root / "straight.yaml", cache, root / "straight", strategy), root / "run0")
    train(lora_recipe(root / "first.yaml", cache, root / "resumed", strategy, max_train_steps=2), root / "run1")
    train(lora_recipe(root / "second.yaml", cache, root / "resumed", strategy), root / "run2")
    return strategy, root


def test_adapters_train_and_resume_exactly_from_adapter_only_checkpoints(runs):
    from sd35dist.checkpoint.export import checkpoint_state

    strategy, root = runs
    expected = losses(root / "run0")
    assert sorted(expected) == [1, 2, 3, 4]
    assert losses(root / "run1") == {s: expected[s] for s in (1, 2)}
    assert losses(root / "run2") == {s: expected[s] for s in (3, 4)}, "CPU/gloo resume is exact"
    for use_ema in (False, True):
        resumed = checkpoint_state(CheckpointDir(root / "resumed").latest(), use_ema)
        straight = checkpoint_state(CheckpointDir(root / "straight").latest(), use_ema)
        adapters = sorted(k for k in straight if ".lora_" in k)
        assert adapters and resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in adapters), "final adapters (and EMA) equal"
    assert not any(k.endswith("to_q.weight") for k in straight), "no base weights in a LoRA checkpoint"
    b = next(k for k in adapters if ".lora_B." in k)
    assert straight[b].abs().max() > 0, "B starts at zero: training moved it"

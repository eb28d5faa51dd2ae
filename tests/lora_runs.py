"""Adapter fine-tunes as the tests run them (tests/test_lora.py, tests/test_lycoris.py): a 4-step
recipe with a checkpoint every 2 and the strategy named, `sd35dist export` of a run in this process
(and once per test module as a child process), and the transformer inputs every output comparison feeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.cli_runs import PROJECT, sd35dist_in_process
from tests.train_runs import train_recipe

LORA = {"rank": 4, "alpha": 8.0, "targets": "attention_ff"}
# Accumulation and clipping as in full fine-tunes; 4 steps, a checkpoint every 2.
SETTINGS = {"max_train_steps": 4, "checkpointing_steps": 2, "gradient_accumulation_steps": 2, "max_grad_norm": 0.05,
            "lora": LORA}


def lora_recipe(path: Path, cache: tuple[Path, Path], output: Path, strategy: str, **train) -> Path:
    train_recipe(path, cache, output, **{**SETTINGS, **train})
    recipe = yaml.safe_load(path.read_text())
    recipe["parallel"]["strategy"] = strategy
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def export_adapters(checkpoint: Path, out: Path, *flags: str) -> str:
    """`sd35dist export CHECKPOINT --out OUT FLAGS…` through the CLI's entry in this process, which must
    succeed; its stdout."""
    code, stdout, stderr = sd35dist_in_process("export", str(checkpoint), "--out", str(out), *flags)
    assert code == 0, stderr[-3000:]
    return stdout


def export_adapters_cli(checkpoint: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """`sd35dist export CHECKPOINT --out OUT FLAGS…` as a child process, as typed in a shell, which must succeed."""
    proc = subprocess.run([sys.executable, "-m", "sd35dist", "export", str(checkpoint), "--out", str(out), *flags],
                          capture_output=True, text=True, cwd=PROJECT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def probe_inputs(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, config.in_channels, 8, 8, generator=generator),
            "timestep": torch.tensor([500.0, 100.0]),
            "encoder_hidden_states": torch.randn(2, 12, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator)}

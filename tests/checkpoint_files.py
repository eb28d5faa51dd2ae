"""Checkpoints written straight to disk for the tools that read them (inspect, export, sample),
without a training run: the tiny transformer's weights in the FSDP2 format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml


def write_checkpoint(path: Path, model_dir: Path, *, lora: bool = False, pretrained: Path | None = None) -> Path:
    """A complete FSDP2-format checkpoint (DCP, COMPLETE, recipe, config) of the tiny transformer, or of
    two LoRA adapters on it."""
    import torch.distributed.checkpoint as dcp
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(model_dir / "transformer")
    if lora:
        layer = "transformer_blocks.0.attn.to_q"
        state = {f"model.{layer}.lora_A.default.weight": torch.randn(4, 32),
                 f"model.{layer}.lora_B.default.weight": torch.zeros(32, 4)}
    else:
        state = {f"model.{key}": value for key, value in model.state_dict().items()}
    path.mkdir(parents=True)
    (path.parent / "latest").write_text(path.name + "\n")
    dcp.save(state, checkpoint_id=str(path / "dcp"), no_dist=True)
    recipe = {"name": "t", "model": {"pretrained": str(pretrained or model_dir)}, "data": {"cache_url": "/nowhere"},
              "output": {"dir": str(path.parent.parent)},
              "train": {"lora": {"rank": 4, "alpha": 4.0, "targets": ["to_q"]}} if lora else {}}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (path / "transformer_config.json").write_text(json.dumps(dict(model.config), default=str))
    (path / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (path / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": 1, "strategy": "fsdp2"}))
    return path

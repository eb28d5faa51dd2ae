"""`make demo`'s LoRA leg, after the full fine-tune (sd35dist/demo.py calls `lora_leg`):

1. `sd35dist submit --profile local --recipe recipes/tiny-lora.yaml` trains a rank-4 LoRA on the
   same tiny SD3 and cache (4 steps; the checkpoint holds only the adapters)
2. `sd35dist export` writes pytorch_lora_weights.safetensors (diffusers' format, EMA adapters)
3. StableDiffusion3Pipeline.load_lora_weights loads it into the base model; one sample image
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny-lora.yaml"


def sample_with_lora(model_dir: Path, lora_dir: Path, out: Path) -> Path:
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("k4s4, a red fox in watercolor style", height=64, width=64, num_inference_steps=8,
                 guidance_scale=4.0, max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out)
    return out


def lora_leg(demo: Path, model_dir: Path, sd35dist: Callable[..., None]) -> str:
    """Train, export and sample the LoRA; returns the summary lines for the demo's report."""
    for stale in ("output-lora", "export-lora", "sample-lora.png"):
        path = demo / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    sd35dist("submit", "--profile", "local", "--recipe", str(RECIPE), "--wait")
    sd35dist("export", str(demo / "output-lora"), "--out", str(demo / "export-lora"), "--ema", "--dtype", "fp32")
    image = sample_with_lora(model_dir, demo / "export-lora", demo / "sample-lora.png")
    return (f"  LoRA          {demo / 'output-lora' / 'checkpoints'} (adapters only)\n"
            f"  LoRA export   {demo / 'export-lora' / 'pytorch_lora_weights.safetensors'} (diffusers, ComfyUI)\n"
            f"  LoRA sample   {image}")

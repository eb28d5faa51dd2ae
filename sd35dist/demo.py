"""`make demo`: the embedded default end to end on this machine, through the same commands a
cluster user types (profile `local`: submitit's local executor, torchrun, 2 CPU ranks, gloo).

1. a tiny SD3 (real diffusers classes) and a small generated image dataset under runs/demo/
2. `sd35dist submit --profile local --job preflight`
3. `sd35dist submit --profile local --job cache`          latent + text-embedding cache
4. `sd35dist submit --profile local` to step 16, then again: it resumes from `latest` to step 32,
   rendering validation images on both ranks at steps 0, 16 and 32; then `--job sweep`: the kept
   checkpoints side by side in one grid (runs/demo/output/sweep/grid.png)
5. `sd35dist export` the final checkpoint (EMA weights) to a diffusers transformer/
6. one sample image from StableDiffusion3Pipeline with the exported transformer
7. the run report over both submissions, and the loss's moving average: it must fall
8. a LoRA of the same model: train, export, load_lora_weights, sample (sd35dist/demo_lora.py)
9. the same weights as one SD3.5-layout file, and `sd35dist inspect --diff` against the base
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
RECIPE = PROJECT / "recipes" / "tiny.yaml"


def sd35dist(*args: str) -> None:
    command = [sys.executable, "-m", "sd35dist", *args]
    print(f"\n$ sd35dist {' '.join(args)}", flush=True)
    subprocess.run(command, check=True)


def sample_image(model_dir: Path, transformer_dir: Path, out: Path) -> Path:
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel.from_pretrained(transformer_dir, dtype=torch.float32)
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, transformer=transformer, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("k4s4, a red fox in watercolor style", height=64, width=64, num_inference_steps=8,
                 guidance_scale=4.0, max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out)
    return out


def main() -> int:
    from sd35dist.data.demo_dataset import write_demo_dataset
    from sd35dist.demo_lora import lora_leg
    from sd35dist.demo_model_files import share_and_inspect
    from sd35dist.models.tiny_sd3 import build_tiny_sd3
    from sd35dist.validation.demo_leg import show_training

    # The recipe's relative paths and the profile's run_root resolve against the working
    # directory (the project root under `make demo`).
    runs = Path.cwd() / "runs"
    DEMO = runs / "demo"
    started = time.perf_counter()
    for stale in ("cache", "output", "export", "sample.png", "report"):
        path = DEMO / stale
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    model_dir = build_tiny_sd3(DEMO / "tiny-sd3")
    if not (DEMO / "images").is_dir():
        write_demo_dataset(DEMO / "images", count=16, seed=0)
    print(f"tiny SD3 in {model_dir}; 16 images with captions in {DEMO / 'images'}")
    common = ("--profile", "local", "--recipe", str(RECIPE), "--wait")
    sd35dist("submit", *common, "--job", "preflight")
    sd35dist("submit", *common, "--job", "cache")
    sd35dist("cache", "inspect", str(DEMO / "cache"))
    sd35dist("submit", *common, "--set", "train.max_train_steps=16")
    print("\n(stopped at step 16 — the next submission resumes from the latest checkpoint)")
    sd35dist("submit", *common)
    sd35dist("submit", *common, "--job", "sweep")  # both ranks render every kept checkpoint into one grid
    sd35dist("export", str(DEMO / "output"), "--out", str(DEMO / "export" / "transformer"), "--ema", "--dtype", "fp32")
    image = sample_image(model_dir, DEMO / "export" / "transformer", DEMO / "sample.png")
    show_training(runs, DEMO / "report")
    lora = lora_leg(DEMO, model_dir, sd35dist)  # sd35dist/demo_lora.py: train, export, load and sample a LoRA
    single_file, diff_png = share_and_inspect(DEMO / "output", model_dir, DEMO / "export")
    print(f"""
demo finished in {time.perf_counter() - started:.0f} s
  model         {model_dir}
  images        {DEMO / 'images'}
  cache         {DEMO / 'cache'} (manifest.json, report.json)
  runs          {runs}/tiny-*  (frozen recipe, logs, preflight.json, metrics-rank*.jsonl)
  checkpoints   {DEMO / 'output' / 'checkpoints'}
  sweep grid    {DEMO / 'output' / 'sweep' / 'grid.png'} (rows prompts, columns checkpoints x seeds)
  export        {DEMO / 'export' / 'transformer'} (EMA weights, diffusers layout)
  single file   {single_file} (SD3.5 layout + VAE, bf16)
  change plot   {diff_png}
  sample image  {image}
{lora}
ComfyUI-ready (the tiny MMDiT has SD3's shape: as many 64-wide heads as blocks; its VAE and text encoders
are toy-sized, so load the diffusion model, not Load Checkpoint; docs/formats.md):
  ComfyUI/models/diffusion_models/ <- {single_file} (Load Diffusion Model)
  ComfyUI/models/loras/            <- {DEMO / 'export-lora' / 'pytorch_lora_weights.safetensors'} (LoraLoaderModelOnly)""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

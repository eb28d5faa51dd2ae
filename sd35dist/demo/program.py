"""The demo's steps in order, each a command a user types, printed before it runs.

The CLI runs in a process of its own (`sd35dist(...)`), as it does for a user; the demo itself
only writes the inputs, samples with diffusers' own pipeline (`sample_image`, which shows the
exports load where users load them), and checks that training learned.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sd35dist.config.loading import read_yaml_mapping

PROJECT = Path(__file__).resolve().parents[2]
RECIPE = PROJECT / "recipes" / "tiny.yaml"
LORA_RECIPE = PROJECT / "recipes" / "tiny-lora.yaml"
DEMO = Path("runs") / "demo"
"""Relative to the working directory, as the recipes' model, cache and output paths are."""
IMAGES = 16
STOP_AT_STEP = 16
"""The first training submission ends here; the schedule runs to the recipe's max_train_steps (32)."""
PROMPT = "k4s4, a red fox in watercolor style"
TRAIN_RUN_PREFIX = "tiny-train-"
"""Run directories of recipes/tiny.yaml's train jobs: `<recipe name>-<job>-<time>`."""


class DemoFailed(SystemExit):
    """One line saying which step failed; the command's own output above it says why."""


def shown(path: Path) -> str:
    """`path` as a user would type it here: relative to the working directory when inside it."""
    absolute = path.resolve()
    return os.path.relpath(absolute) if absolute.is_relative_to(Path.cwd()) else str(absolute)


def sd35dist(*args: str | Path) -> None:
    """Run `sd35dist ARGS` in a process of its own, as a user types it, after printing it."""
    words = [shown(arg) if isinstance(arg, Path) else arg for arg in args]
    print(f"\n$ sd35dist {shlex.join(words)}", flush=True)
    status = subprocess.run([sys.executable, "-m", "sd35dist", *words]).returncode
    if status:
        raise DemoFailed(f"demo: `sd35dist {shlex.join(words)}` failed with exit status {status}")


def sample_image(model_dir: Path, out: Path, *, transformer: Path | None = None, lora: Path | None = None) -> Path:
    """One image from diffusers' StableDiffusion3Pipeline: the base model with an exported
    `transformer/` in place of its own, or with an exported LoRA loaded into it."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    parts = {}
    if transformer is not None:
        parts["transformer"] = SD3Transformer2DModel.from_pretrained(transformer, dtype=torch.float32)
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True, **parts)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    # One thread, as the local profile's ranks run: the demo shares the cores with whatever else runs, and
    # torch's OpenMP threads stall whenever one core is taken (a 64-px sample with the demo's SD3-sized VAE,
    # measured under load: 1.1 CPU-s on one thread, 2.8-7.6 on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = pipe(PROMPT, height=64, width=64, num_inference_steps=8, guidance_scale=4.0, max_sequence_length=32,
                     generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        torch.set_num_threads(threads)
    image.save(out)
    what = f"transformer {shown(transformer)}" if transformer else f"LoRA {shown(lora)}" if lora else "the base model"
    print(f"\nStableDiffusion3Pipeline.from_pretrained({shown(model_dir)}) with {what}: {shown(out)}", flush=True)
    return out


def training_run_dirs(runs: Path) -> list[Path]:
    """The run directories of the last training from step 0 and of the submissions that resumed it."""
    dirs = sorted(p for p in runs.glob(f"{TRAIN_RUN_PREFIX}*") if (p / "metrics-rank00000.jsonl").is_file())
    chain: list[Path] = []
    for run_dir in dirs:
        first_line = (run_dir / "metrics-rank00000.jsonl").read_text().split("\n", 1)[0]
        if first_line and json.loads(first_line)["step"] == 1:
            chain = []
        chain.append(run_dir)
    return chain


def show_training(runs: Path, out: Path) -> Path:
    """One report over the training's submissions; fails when the loss's moving average did not fall
    (a pipeline that runs but learns nothing is broken)."""
    from sd35dist.validation.report import loss_summary, read_runs, validation_grids, write_report

    run_dirs = training_run_dirs(runs)
    if not run_dirs:
        raise DemoFailed(f"demo: no training metrics found under {shown(runs)}")
    report = write_report(run_dirs[-1], *run_dirs[:-1], out=out)
    summary = loss_summary(read_runs(run_dirs))
    print("\nwhat training did:")
    for step, grid in validation_grids(run_dirs):
        print(f"  validation grid, step {step:<4} {shown(grid)}")
    print(f"  report                      {shown(report)}  (plots in {shown(out / 'plots')})")
    if summary is None:
        raise DemoFailed("demo: the run logged no loss")
    first, last, window = summary
    print(f"  loss, moving average over {window} steps: {first:.4f} at the start -> {last:.4f} at the end")
    if not last < first:
        raise DemoFailed(f"demo: the loss did not fall ({first:.4f} -> {last:.4f}): training learns nothing")
    return report


def remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def main() -> int:
    from sd35dist.demo.dataset import write_demo_dataset
    from sd35dist.models.tiny_sd3 import SD3_VAE_SIZES, build_tiny_sd3, has_vae_sizes

    started = time.perf_counter()
    total_steps = read_yaml_mapping(RECIPE)["train"]["max_train_steps"]
    # What earlier demos left: the model and the images are kept (deterministic, slow to make).
    remove(*(DEMO / name for name in ("cache", "output", "export", "sample.png", "report",
                                      "output-lora", "export-lora", "sample-lora.png")))
    model = DEMO / "tiny-sd3"
    if (model / "vae" / "config.json").is_file() and not has_vae_sizes(model, SD3_VAE_SIZES):
        remove(model)  # an earlier demo's, made before the demo's VAE had SD3's shape
    # SD3's full VAE (84M parameters), so that the single file opens in ComfyUI's Load Checkpoint.
    build_tiny_sd3(model, vae_sizes=SD3_VAE_SIZES)
    images = DEMO / "images"
    if not images.is_dir():
        write_demo_dataset(images, count=IMAGES, seed=0)
    print(f"tiny SD3 in {shown(model)}; {IMAGES} images with captions in {shown(images)}")

    local = ("submit", "--profile", "local", "--recipe", RECIPE, "--wait")
    sd35dist(*local, "--job", "preflight")
    sd35dist(*local, "--job", "cache")
    sd35dist("cache", "inspect", DEMO / "cache")
    sd35dist(*local, "--set", f"train.stop_at_step={STOP_AT_STEP}")
    print(f"\n(stopped at step {STOP_AT_STEP} as a preempted job does, the schedule still running to step "
          f"{total_steps}: the next submission resumes from the latest checkpoint)")
    sd35dist(*local)
    sd35dist(*local, "--job", "sweep")  # both ranks render every kept checkpoint into one grid
    transformer = DEMO / "export" / "transformer"
    sd35dist("export", DEMO / "output", "--out", transformer, "--ema", "--dtype", "fp32")
    sample = sample_image(model, DEMO / "sample.png", transformer=transformer)
    single_file, diff_png = DEMO / "export" / "tiny-sd3-ft.safetensors", DEMO / "export" / "change-by-block.png"
    sd35dist("export", DEMO / "output", "--format", "single-file", "--ema", "--dtype", "bf16", "--with-vae",
             "--title", "tiny SD3 demo fine-tune", "--out", single_file)
    sd35dist("inspect", DEMO / "output", "--ema", "--diff", model, "--png", diff_png, "--summary")
    show_training(Path("runs"), DEMO / "report")

    # A LoRA of the same model and cache: the checkpoint holds only the adapters.
    sd35dist("submit", "--profile", "local", "--recipe", LORA_RECIPE, "--wait")
    sd35dist("export", DEMO / "output-lora", "--out", DEMO / "export-lora", "--ema", "--dtype", "fp32")
    lora_sample = sample_image(model, DEMO / "sample-lora.png", lora=DEMO / "export-lora")

    print(f"""
demo finished in {time.perf_counter() - started:.0f} s
  model         {shown(model)}
  images        {shown(images)}
  cache         {shown(DEMO / 'cache')} (manifest.json, report.json)
  runs          {shown(Path('runs'))}/tiny-*  (frozen recipe, logs, preflight.json, metrics-rank*.jsonl)
  checkpoints   {shown(DEMO / 'output' / 'checkpoints')}
  sweep grid    {shown(DEMO / 'output' / 'sweep' / 'grid.png')} (rows prompts, columns checkpoints x seeds)
  export        {shown(transformer)} (EMA weights, diffusers layout)
  single file   {shown(single_file)} (SD3.5 layout + VAE, bf16)
  change plot   {shown(diff_png)}
  sample image  {shown(sample)}
  report        {shown(DEMO / 'report' / 'report.html')}
  LoRA          {shown(DEMO / 'output-lora' / 'checkpoints')} (adapters only)
  LoRA export   {shown(DEMO / 'export-lora' / 'pytorch_lora_weights.safetensors')} (diffusers, ComfyUI)
  LoRA sample   {shown(lora_sample)}
ComfyUI-ready (the tiny MMDiT has SD3's shape, as many 64-wide heads as blocks, and its VAE is SD3's; the
file holds no text encoders: ComfyUI builds full-size ones, the tiny model's are not; docs/formats.md):
  ComfyUI/models/checkpoints/ <- {shown(single_file)} (Load Checkpoint: MODEL and VAE)
  ComfyUI/models/loras/       <- {shown(DEMO / 'export-lora' / 'pytorch_lora_weights.safetensors')} (LoraLoaderModelOnly)""")
    return 0

"""`make demo` (`python -m sd35dist.demo`): the embedded default end to end on this machine,
through the commands a cluster user types, each printed before it runs (profile `local`:
submitit's local executor, torchrun, 2 CPU ranks, gloo). Nothing is downloaded.

1. a tiny SD3 (real diffusers classes, sd35dist/models/tiny_sd3.py; its VAE at SD3's full shape, so
   that the single file opens in ComfyUI) and 16 generated captioned images (dataset.py) under runs/demo/
2. `sd35dist submit --profile local --job preflight`
3. `sd35dist submit --profile local --job cache` (latent + text-embedding cache), `sd35dist cache inspect`
4. `sd35dist submit --profile local --set train.stop_at_step=16`: training ends at step 16 with a
   checkpoint while its cosine schedule keeps step 32 as its end; `sd35dist submit --profile local`
   resumes from `latest` to step 32, so the run report's learning-rate plot is one schedule.
   Validation images on both ranks at steps 0, 16 and 32.
5. `--job sweep`: the kept checkpoints side by side in one grid (runs/demo/output/sweep/grid.png)
6. `sd35dist export` (EMA weights, diffusers transformer/) and one image from diffusers'
   StableDiffusion3Pipeline with it; the same weights as one SD3.5-layout file, and
   `sd35dist inspect --diff` against the base model
7. the run report over both submissions; the demo fails unless the loss's moving average falls
8. a LoRA of the same model: `submit` recipes/tiny-lora.yaml, `export`, load_lora_weights, one image

program.py holds the steps in this order; README.md's "What `make demo` does" quotes what it
prints, and tests/test_demo.py keeps the two equal.
"""

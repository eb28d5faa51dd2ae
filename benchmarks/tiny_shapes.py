"""What the tiny SD3's shape costs: parameters and one forward + backward of the tiny transformer
(batch 2, 8×8 latents, 154 text tokens, one CPU thread) for the shapes considered in issue 23 —
the old one (4 heads of 8, 4 blocks), the shapes with SD3's 64-wide heads, and the full-size SD VAE
a ComfyUI-accepted VAE would need (its build, encode and save).

    .venv/bin/python benchmarks/tiny_shapes.py [--repeats 5]

Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # run from a checkout without installing

from sd35dist.models.tiny_sd3 import TRANSFORMER_SIZES

SHAPES = {  # name → (heads, head width, blocks)
    "old tiny: 4 heads × 8, 4 blocks": (4, 8, 4),
    "1 head × 64, 4 blocks (ComfyUI: 1 block)": (1, 64, 4),
    "2 heads × 64, 2 blocks (the tiny model)": (2, 64, 2),
    "4 heads × 64, 4 blocks": (4, 64, 4),
}


def step_ms(heads: int, width: int, blocks: int, repeats: int) -> tuple[int, float]:
    from diffusers import SD3Transformer2DModel

    config = dict(TRANSFORMER_SIZES, num_attention_heads=heads, attention_head_dim=width, num_layers=blocks,
                  caption_projection_dim=heads * width)
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**config)
    inputs = {"hidden_states": torch.randn(2, 16, 8, 8), "timestep": torch.tensor([500.0, 100.0]),
              "encoder_hidden_states": torch.randn(2, 154, config["joint_attention_dim"]),
              "pooled_projections": torch.randn(2, config["pooled_projection_dim"])}
    for _ in range(2):
        model(**inputs, return_dict=False)[0].sum().backward()
    started = time.perf_counter()
    for _ in range(repeats):
        model(**inputs, return_dict=False)[0].sum().backward()
    return sum(p.numel() for p in model.parameters()), (time.perf_counter() - started) / repeats * 1000


def full_vae() -> str:
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        use_quant_conv=False, use_post_quant_conv=False)
    built = time.perf_counter() - started
    with torch.no_grad():
        started = time.perf_counter()
        vae.encode(torch.randn(3, 3, 32, 32))
        encoded = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        vae.save_pretrained(tmp)
        saved = time.perf_counter() - started
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*"))
    params = sum(p.numel() for p in vae.parameters())
    return (f"| full-size SD3 VAE (what ComfyUI's VAE loader accepts) | {params:,} | build {built:.2f} s, "
            f"encode 3 × 32² {encoded:.2f} s, save {saved:.2f} s ({size / 2**20:.0f} MiB fp32) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| shape | parameters | forward + backward (ms) |\n|---|---|---|")
    for name, shape in SHAPES.items():
        params, ms = step_ms(*shape, args.repeats)
        print(f"| {name} | {params:,} | {ms:.0f} |")
    print(full_vae())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small generated image dataset (PNG + NAME.txt captions) for the demo and the tests.

Images are smooth colour fields with a few shapes, deterministic from the seed, in several
aspect ratios so they spread over the buckets. Nothing is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SUBJECTS = ("a red fox", "a lighthouse", "a bowl of fruit", "a mountain lake", "an old tram", "a paper boat")
STYLES = ("watercolor", "oil painting", "ink sketch", "pixel art", "photograph", "pastel")
DETAILS = ("at dusk", "soft light", "high detail", "wide angle", "muted colours", "bold outlines", "foggy")
DEMO_BUCKETS = [[64, 64], [80, 48], [48, 80]]
"""Buckets at the tiny model's scale (multiples of 16, as SD3's VAE /8 and patch 2 need)."""
DEMO_SIZES = ((96, 96), (128, 77), (77, 128), (64, 64), (150, 90), (90, 150))


def demo_caption(rng: random.Random, trigger: str) -> str:
    details = rng.sample(DETAILS, 3)
    return ", ".join([trigger, f"{rng.choice(SUBJECTS)} in {rng.choice(STYLES)} style", *details])


def demo_image(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(8, max(9, width // 2)), y0 + rng.randrange(8, max(9, height // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return image


def write_demo_dataset(directory: Path, count: int = 12, seed: int = 0, trigger: str = "k4s4") -> list[Path]:
    """Write `count` PNGs with captions into `directory`; returns the image paths."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        size = DEMO_SIZES[index % len(DEMO_SIZES)]
        path = directory / f"img_{index:04d}.png"
        demo_image(rng, size).save(path)
        path.with_suffix(".txt").write_text(demo_caption(rng, trigger) + "\n")
        paths.append(path)
    return paths


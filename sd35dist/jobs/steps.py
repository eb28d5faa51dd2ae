"""`sd35dist steps --recipe R [--profile P]`: optimizer steps per epoch and in total, per profile.

Counted from the cache's manifest with the function the trainer uses
(stream_order.optimizer_steps_per_epoch: bucket-homogeneous steps, remainder steps included),
so the numbers are the ones training will log. Runs on the submit host: it reads profiles.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from launcher.profile import available_profiles, load_profile, profile_path
from sd35dist.config import ConfigError, Recipe, load_recipe
from sd35dist.config.cli_args import CommandLineParser
from sd35dist.data.manifest import ManifestError, read_manifest
from sd35dist.data.storage import Store
from sd35dist.data.stream_order import BucketLayout, bucket_layouts, optimizer_steps_per_epoch


def profile_row(name: str, world_size: int, recipe: Recipe, layouts: list[BucketLayout]) -> str:
    """One table line: ranks, global batch, steps per epoch, total steps, epochs."""
    train = recipe.train
    per_epoch = max(1, optimizer_steps_per_epoch(layouts, world_size, train.train_batch_size, recipe.seed,
                                                 train.gradient_accumulation_steps))
    total = train.max_train_steps or per_epoch * (train.num_train_epochs or 1)
    batch = train.train_batch_size * world_size * train.gradient_accumulation_steps
    return f"{name:<14} {world_size:>5} {batch:>12} {per_epoch:>11} {total:>11} {math.ceil(total / per_epoch):>6}"


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist steps", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--profile", action="append", help="profile name or YAML (default: every profile)")
    return parser


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    try:
        recipe = load_recipe(Path(args.recipe))
        train = recipe.train
        if train.max_train_steps is None and train.num_train_epochs is None:
            raise ConfigError(Path(args.recipe).name, "train", "set max_train_steps or num_train_epochs")
        profiles = [(Path(name).stem, load_profile(profile_path(name))) for name in args.profile or available_profiles()]
        manifest = read_manifest(Store(recipe.data.cache_url, recipe.data.storage_options))
        layouts = bucket_layouts([(s.bucket, s.samples) for s in manifest.shards])
        print(f"{manifest.total_samples} samples per epoch in {len(layouts)} buckets; "
              f"{train.train_batch_size} per GPU, gradient accumulation {train.gradient_accumulation_steps}")
        print(f"{'profile':<14} {'ranks':>5} {'global batch':>12} {'steps/epoch':>11} {'total steps':>11} {'epochs':>6}")
        for name, profile in profiles:  # all read before the cache: a bad --profile is named first
            print(profile_row(name, profile.world_size, recipe, layouts))
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

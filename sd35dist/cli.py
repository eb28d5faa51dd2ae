"""The `sd35dist` command: submit-side commands go to the launcher (no torch imported),
rank-side commands (run under torchrun on every rank) to sd35dist.jobs."""

from __future__ import annotations

import argparse
import importlib
import sys

LAUNCHER_COMMANDS = ("submit", "status", "logs", "cancel")
PLANNING_COMMANDS = ("steps",)
RANK_COMMANDS = {
    "preflight": ("sd35dist.jobs.preflight", "check the cluster before a long job: collectives, recipe, storage"),
    "train": ("sd35dist.train.loop", "train: the SD3.5 fine-tune every rank runs (FSDP2)"),
    "cache": ("sd35dist.jobs.cache", "build the latent + text-embedding cache (`sd35dist cache inspect URL` to read one)"),
}
RUN_DIR_REQUIRED = ("preflight",)


def _rank_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd35dist",
        description="SD3.5 fine-tunes on Slurm clusters. Submit side: "
        + ", ".join(LAUNCHER_COMMANDS)
        + " (see `sd35dist submit -h`). Rank side, under torchrun: "
        + ", ".join(RANK_COMMANDS)
        + ".",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in LAUNCHER_COMMANDS:
        sub.add_parser(name, help=f"(submit side) sd35dist {name} -h", add_help=False)
    for name, (_, helptext) in RANK_COMMANDS.items():
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--recipe", required=True, help="recipe YAML (the frozen copy in the run directory)")
        p.add_argument("--run-dir", required=name in RUN_DIR_REQUIRED, help="run directory for reports and metrics")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LAUNCHER_COMMANDS:
        from launcher.cli import main as launcher_main

        return launcher_main(argv)
    if argv[:1] == ["steps"]:
        return steps_main(argv[1:])
    if argv[:1] == ["torchrun"]:
        from sd35dist.jobs.torchrun import main as torchrun_main

        return torchrun_main(argv[1:])
    if argv[:1] == ["export"]:
        from sd35dist.checkpoint.export import main as export_main

        return export_main(argv[1:])
    if argv[:2] == ["cache", "inspect"]:
        from sd35dist.jobs.cache import inspect_main

        return inspect_main(argv[2:])
    args = _rank_parser().parse_args(argv)
    module = importlib.import_module(RANK_COMMANDS[args.command][0])
    return module.main(args)


def steps_main(argv: list[str]) -> int:
    """`sd35dist steps --recipe R [--profile P]`: optimizer steps per epoch and in total, per profile.

    Counted from the cache's manifest the way the stream runs an epoch (bucket-homogeneous
    steps, remainder steps included), so the numbers are the ones training will log.
    """
    import math
    from pathlib import Path

    from launcher.profile import available_profiles, load_profile, profile_path
    from sd35dist.config import ConfigError, load_recipe
    from sd35dist.data.manifest import ManifestError, read_manifest
    from sd35dist.data.storage import Store
    from sd35dist.data.stream_order import bucket_layouts, full_epoch, plan_segment

    parser = argparse.ArgumentParser(prog="sd35dist steps", description=steps_main.__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--profile", action="append", help="profile name or YAML (default: every profile)")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(Path(args.recipe))
        train = recipe.train
        if train.max_train_steps is None and train.num_train_epochs is None:
            raise ConfigError(Path(args.recipe).name, "train", "set max_train_steps or num_train_epochs")
        manifest = read_manifest(Store(recipe.data.cache_url, recipe.data.storage_options))
        layouts = bucket_layouts([(s.bucket, s.samples) for s in manifest.shards])
        print(f"{manifest.total_samples} samples per epoch in {len(layouts)} buckets; "
              f"{train.train_batch_size} per GPU, gradient accumulation {train.gradient_accumulation_steps}")
        print(f"{'profile':<14} {'ranks':>5} {'global batch':>12} {'steps/epoch':>11} {'total steps':>11} {'epochs':>6}")
        for name in args.profile or available_profiles():
            profile = load_profile(profile_path(name))
            world = profile.world_size
            micro = len(plan_segment(full_epoch(layouts), world, train.train_batch_size, recipe.seed, 0).steps)
            per_epoch = max(1, math.ceil(micro / train.gradient_accumulation_steps))
            total = train.max_train_steps or per_epoch * (train.num_train_epochs or 1)
            batch = train.train_batch_size * world * train.gradient_accumulation_steps
            print(f"{Path(name).stem:<14} {world:>5} {batch:>12} {per_epoch:>11} {total:>11} {math.ceil(total / per_epoch):>6}")
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    sys.exit(main())

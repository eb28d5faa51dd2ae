"""`sd35dist sweep OUTPUT_DIR [--steps 400,800] [--compare-guidance]`: the recipe's validation prompts x
seeds for every kept checkpoint (or the steps named), as one labelled grid: rows = prompts,
columns = steps (x CFG/APG with --compare-guidance, x seeds). The prompts' embeddings come from
the cache, as in training, so no text encoder is loaded. It runs in one process, or under
torchrun on every rank: each rank loads the whole transformer (inference needs no optimizer
state) and renders its share of the images; rank 0 writes the grid.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd35dist.checkpoint.layout import CheckpointDir
from sd35dist.config.cli_args import CommandLineParser, fail, int_list
from sd35dist.config.input_checks import size_problem
from sd35dist.config.loading import ConfigError, load_model
from sd35dist.config.recipe import Recipe, resolve_paths
from sd35dist.config.validation_section import PromptsFileError
from sd35dist.data.manifest import ManifestError, read_manifest
from sd35dist.data.storage import Store
from sd35dist.data.validation_prompts import read_validation_prompts
from sd35dist.validation.during_training import sample_settings
from sd35dist.validation.grid import labelled_grid
from sd35dist.validation.render import launched_ranks, validation_pairs
from sd35dist.validation.sample_command import (
    check_out_dir,
    earlier_grid,
    inference_device,
    renderer_for,
    skip_layer_arguments,
    skip_layers_of,
)
from sd35dist.validation.sources import (
    SourceError,
    check_base_model,
    check_has_ema,
    checkpoint_recipe,
    load_transformer,
    source_config,
    vae_scale_of,
)

SWEEP_DIR = "sweep"


def argument_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="sd35dist sweep", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("output_dir", type=Path, nargs="?",
                        help="a training output directory (holds checkpoints/); default: the --recipe's output.dir")
    parser.add_argument("--steps", type=int_list, help="comma-separated checkpoint steps (default: every kept checkpoint)")
    parser.add_argument("--compare-guidance", action="store_true", help="CFG and APG columns at the same seeds")
    parser.add_argument("--recipe", type=Path, help="recipe whose validation section to render (default: the checkpoint's)")
    parser.add_argument("--ema", action="store_true", help="the checkpoints' EMA weights")
    parser.add_argument("--out", type=Path, help="where grid.png goes (default: OUTPUT_DIR/sweep)")
    parser.add_argument("--force", action="store_true", help="let --out replace an earlier grid.png")
    parser.add_argument("--run-dir", type=Path, help="`submit --job sweep` passes its run directory (logs live there)")
    skip_layer_arguments(parser, "default: the recipe's validation.skip_layer_guidance; none: off")
    return parser


def main(argv: list[str]) -> int:
    args = argument_parser().parse_args(argv)
    if args.run_dir is not None and not args.run_dir.is_dir():
        return fail(f"--run-dir {args.run_dir}: not a directory (`submit --job sweep` passes its run directory)")
    problem = earlier_grid(args.out, args.force) if args.out else None  # the default OUTPUT_DIR/sweep is ours
    if problem:
        return fail(problem)
    given = None
    if args.recipe:
        try:
            given = resolve_paths(load_model(Recipe, args.recipe), args.recipe.resolve().parent)
        except ConfigError as err:
            return fail(str(err))
    if args.output_dir is None:  # `submit --job sweep`: the frozen recipe says where its checkpoints are
        if given is None:
            return fail("sd35dist sweep: give OUTPUT_DIR or --recipe")
        args.output_dir = Path(given.output.dir)
    checkpoints = CheckpointDir(args.output_dir)
    kept = checkpoints.complete_steps()
    steps = args.steps or kept
    missing = [s for s in steps if s not in kept]
    if not steps or missing:
        return fail(f"{args.output_dir}: no complete checkpoint for step(s) {missing or 'any'} "
                    f"(kept: {', '.join(map(str, kept)) or 'none'})")
    try:
        if args.out is not None:
            check_out_dir(args.out)
        if args.ema:
            for step in steps:
                check_has_ema(checkpoints.path(step))
        if given is not None:
            recipe, recipe_name = given, args.recipe.name
        else:
            recipe, recipe_name = checkpoint_recipe(checkpoints.path(steps[-1])), "the checkpoint's recipe.yaml"
        if recipe is None or not recipe.validation.enabled:
            raise ConfigError(str(args.recipe or "recipe"), "validation.prompts",
                              "no validation prompts to sweep: add them, then `sd35dist cache --validation-only`")
        # What the renders need, before a weight is read: the base model's VAE and scheduler, a size it takes.
        base = Path(recipe.model.pretrained)
        check_base_model(base, f"{recipe_name}: model.pretrained", ("vae", "scheduler"))
        config = source_config(checkpoints.path(steps[-1]))
        width, height = recipe.validation.resolutions[0]
        problem = size_problem(width, height, config, vae_scale_of(base))
        if problem:
            raise ConfigError(recipe_name, "validation.resolutions", problem)
        skipped = sample_settings(recipe).guidance.skip_layers if args.skip_layers is None else args.skip_layers
        blocks = int(config.get("num_layers") or 0)
        if skipped and blocks and max(skipped) >= blocks:
            raise SourceError(f"skip-layer guidance layers {list(skipped)}: the transformer has blocks 0–{blocks - 1}")
        if args.skip_layers and args.skip_start >= args.skip_stop:
            raise SourceError(f"--skip-start {args.skip_start:g} must be below --skip-stop {args.skip_stop:g}")
        store = Store(recipe.data.cache_url, recipe.data.storage_options)
        embeddings = read_validation_prompts(store, read_manifest(store), recipe.validation, recipe_name)
    except (ConfigError, ManifestError, SourceError, PromptsFileError) as err:
        return fail(str(err))
    with launched_ranks() as world:  # under torchrun: every rank renders its share
        return _sweep(args, steps, recipe, embeddings, checkpoints, world)


def _sweep(args: argparse.Namespace, steps: list[int], recipe: Recipe, embeddings, checkpoints: CheckpointDir,
           world) -> int:
    section = recipe.validation
    kinds = ["cfg", "apg"] if args.compare_guidance else [section.guidance]
    width, height = section.resolutions[0]
    pairs = validation_pairs(len(embeddings.prompts), section.seeds, [(width, height)])
    device = inference_device(world)
    rank = world.rank if world is not None else 0
    out = args.out or args.output_dir / SWEEP_DIR
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    cells: dict[tuple[int, int], np.ndarray] = {}
    columns: list[str] = []
    for step in steps:
        loaded = load_transformer(checkpoints.path(step), use_ema=args.ema,
                                  dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        renderer = renderer_for(loaded.model, Path(recipe.model.pretrained), device, world)
        for kind in kinds:
            settings = sample_settings(recipe, kind)
            if args.skip_layers is not None:
                settings = dataclasses.replace(settings, guidance=dataclasses.replace(
                    settings.guidance, **skip_layers_of(args)))
            images = renderer.render(pairs, embeddings, settings)  # all of them on rank 0, none elsewhere
            for seed in section.seeds:
                label = (f"step {step}" + (f" {kind}" if len(kinds) > 1 else "")
                         + (f" seed {seed}" if len(section.seeds) > 1 else ""))
                columns.append(label)
                for index, pair in enumerate(pairs):
                    if pair.seed == seed and index in images:
                        cells[pair.prompt, len(columns) - 1] = images[index]
                        Image.fromarray(images[index]).save(out / f"step{step}-{kind}-{pair.file_stem}.png")
        del loaded, renderer
    if rank != 0:
        return 0
    title = (f"sweep of {args.output_dir.name}{' (EMA)' if args.ema else ''} · "
             f"{'/'.join(kinds)} {section.guidance_scale:g} · {section.num_inference_steps} steps · {width}x{height}")
    grid = labelled_grid(cells, list(embeddings.prompts), columns, title)
    grid.save(out / "grid.png")
    print(f"sweep over steps {', '.join(map(str, steps))}: {out / 'grid.png'} "
          f"({len(embeddings.prompts)} prompts x {len(columns)} columns)")
    return 0

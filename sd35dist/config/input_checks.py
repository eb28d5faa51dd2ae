"""What a job's ranks would fail on, checked on the submit host before anything is written.

The schema (recipe.py) judges a recipe alone; these checks read what it names: the validation
prompts file, the model's config.json (position embedding, patch size, module names, the VAE's
downsampling) and the output directory. `sd35dist submit` and `sd35dist plan` run them, and so
does every rank job before it joins its process group (for a script submitted with plain
`sbatch`), so a mistake is one line and exit status 2 — never a traceback after minutes of model
loading, restarted three times. Torch-free: only JSON and file names are read, never weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd35dist.config.loading import ConfigError
from sd35dist.config.model_size import linear_layers, names_module
from sd35dist.config.recipe import LORA_TARGET_PRESETS, Recipe, is_url
from sd35dist.config.validation_section import PromptsFileError, read_prompts_file

VAE_SCALE_DEFAULT = 8
"""SD3's VAE downsamples 8× (2^(len(block_out_channels) - 1)); used when vae/config.json is not there."""
MODEL_JOBS = ("train", "sweep")
"""Jobs that run the transformer at the recipe's image sizes (and train its LoRA targets)."""


def check_recipe_inputs(recipe: Recipe, job: str, recipe_file: str, *, visible_everywhere: bool) -> list[str]:
    """Refuse, as a ConfigError naming the recipe file and key, what `job` would fail on; return
    notes on what could not be checked from here.

    `visible_everywhere`: the job runs on this host (a local profile, or a rank checking itself),
    so a path missing here is missing for the job. On a cluster a path absent from the submitting
    host may exist on the nodes' shared filesystem: it gets a note instead.
    """
    notes: list[str] = []
    check_output_dir(recipe, recipe_file)
    note = check_prompts_file(recipe, recipe_file, visible_everywhere=visible_everywhere)
    if note:
        notes.append(note)
    if job in MODEL_JOBS:
        config = model_config(recipe)
        if config is not None:
            check_image_sizes(recipe, config, vae_scale(recipe), recipe_file)
            check_skip_layers(recipe, config, recipe_file)
            if job == "train":
                check_lora_targets(recipe, config, recipe_file)
    return notes


def check_output_dir(recipe: Recipe, recipe_file: str) -> None:
    """output.dir is a directory or can become one: neither it nor a parent is a file."""
    where = recipe.output.dir
    if is_url(where):
        return
    path = Path(where)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "is a file" if candidate == path else f"cannot be created: {candidate} is a file"
                raise ConfigError(recipe_file, "output.dir",
                                  f"{where} {what}: name a directory for checkpoints and exports")
            return


def check_prompts_file(recipe: Recipe, recipe_file: str, *, visible_everywhere: bool) -> str | None:
    """validation.prompts_file is a UTF-8 text file with at least one prompt (a note when not visible here)."""
    section = recipe.validation
    if section.prompts_file is None:
        return None
    path = Path(section.prompts_file)
    if not path.exists() and not visible_everywhere:
        return f"note: validation.prompts_file {path} is not visible from this host, so it was not checked"
    try:
        read_prompts_file(path)
    except PromptsFileError as err:
        relative = " (a relative prompts_file is read from the recipe's directory)" if not path.exists() else ""
        raise ConfigError(recipe_file, "validation.prompts_file", f"{err}{relative}") from None
    return None


def model_config(recipe: Recipe) -> dict[str, Any] | None:
    """The transformer's config.json, when this host can read it (model_layout checks it is there)."""
    if is_url(recipe.model.pretrained):
        return None
    return _json_object(Path(recipe.model.pretrained) / recipe.model.transformer_subfolder / "config.json")


def vae_scale(recipe: Recipe) -> int:
    """How many pixels one latent pixel stands for (2^(len(block_out_channels) - 1) of vae/config.json)."""
    config = _json_object(Path(recipe.model.pretrained) / "vae" / "config.json") or {}
    channels = config.get("block_out_channels")
    return 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else VAE_SCALE_DEFAULT


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def side_limits(config: dict[str, Any], vae: int) -> tuple[int, int | None]:
    """(multiple, largest side) in pixels the transformer takes: sides are whole patches of latent
    pixels, and at most pos_embed_max_size patches (diffusers' PatchEmbed crops its position
    embedding and raises beyond it); None when the config sets no maximum."""
    patch = int(config.get("patch_size") or 2)
    largest = config.get("pos_embed_max_size")
    return patch * vae, (int(largest) * patch * vae if largest else None)


def size_problem(width: int, height: int, config: dict[str, Any], vae: int) -> str | None:
    """Why the model cannot render or train at width × height pixels, or None."""
    multiple, largest = side_limits(config, vae)
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        return f"{width}x{height}: sides must be positive multiples of {multiple} (patch × VAE downsampling)"
    if largest is not None and max(width, height) > largest:
        return (f"{width}x{height} is beyond the model's position embedding: at most {largest} pixels a side "
                f"(pos_embed_max_size {config['pos_embed_max_size']} × patch × VAE {vae}): use smaller sides")
    return None


def check_image_sizes(recipe: Recipe, config: dict[str, Any], vae: int, recipe_file: str) -> None:
    """The validation resolutions fit the model. (Training's sizes are the cache's buckets, which the
    trainer checks against the model when it opens the cache: the recipe's data.buckets only build it.)"""
    if not recipe.validation.enabled:
        return
    for width, height in recipe.validation.resolutions:
        problem = size_problem(width, height, config, vae)
        if problem:
            raise ConfigError(recipe_file, "validation.resolutions", problem)


def check_skip_layers(recipe: Recipe, config: dict[str, Any], recipe_file: str) -> None:
    """Skip-layer guidance names blocks the transformer has (num_layers of its config)."""
    section = recipe.validation.skip_layer_guidance
    blocks = int(config.get("num_layers") or 0)
    if recipe.validation.enabled and section is not None and blocks and max(section.layers) >= blocks:
        raise ConfigError(recipe_file, "validation.skip_layer_guidance.layers",
                          f"{section.layers}: the transformer in {recipe.model.pretrained} has blocks 0–{blocks - 1}")


def check_lora_targets(recipe: Recipe, config: dict[str, Any], recipe_file: str) -> None:
    """Every module name in train.lora.targets names a Linear of the model (peft's name-or-suffix rule)."""
    lora = recipe.train.lora
    if lora is None or isinstance(lora.targets, str):
        return  # the presets name SD3's own modules
    names = [name for name, _, _ in linear_layers(config)]
    for target in lora.targets:
        if not any(names_module(name, target) for name in names):
            raise ConfigError(recipe_file, "train.lora.targets",
                              f"{target!r} names no Linear module of the model in {recipe.model.pretrained} "
                              f"(e.g. attn.to_q, ff.net.2, or a preset: {', '.join(LORA_TARGET_PRESETS)})")


def check_cache_buckets(buckets: list[str], recipe: Recipe, recipe_file: str) -> None:
    """The cache's buckets ("WxH", from its manifest) fit the model the recipe trains (the rank checks
    this when it opens the cache, before the model is built)."""
    config = model_config(recipe)
    if config is None:
        return
    vae = vae_scale(recipe)
    for bucket in buckets:
        width, height = (int(side) for side in bucket.split("x"))
        problem = size_problem(width, height, config, vae)
        if problem:
            raise ConfigError(recipe_file, "data.cache_url",
                              f"the cache at {recipe.data.cache_url} has a bucket the model cannot train on: "
                              f"{problem}; rebuild it with other data.buckets (sd35dist cache)")

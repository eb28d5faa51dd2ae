"""Where `sd35dist sample` and `sd35dist sweep` get a transformer: a checkpoint (or an output
directory's latest), a diffusers export directory, or the base model directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import CHECKPOINTS, COMPLETE, RECIPE_FILE, saved_recipe
from sd35dist.config.recipe import Recipe
from sd35dist.models.sd3_components import TEXT_ENCODER_PARTS, ModelDirectoryIncomplete, check_model_dir


class SourceError(ValueError):
    """SOURCE is none of the kinds above; the message says what was found."""


@dataclasses.dataclass
class LoadedTransformer:
    model: torch.nn.Module
    label: str
    base_model: Path | None
    """The directory with vae/, text encoders and scheduler/, when the source knows it."""
    recipe: Recipe | None
    """The recipe a checkpoint was trained with (its cache holds the validation prompts)."""


def checkpoint_recipe(checkpoint: Path) -> Recipe | None:
    saved = saved_recipe(checkpoint)
    return Recipe.model_validate(saved) if saved else None


TRANSFORMER_CLASS = "SD3Transformer2DModel"
BASE_MODEL_PARTS = ("vae", *TEXT_ENCODER_PARTS, "scheduler")
"""What sampling reads of the base model: the VAE to decode, the text encoders for the prompts, the scheduler."""


def _checkpoint_of(source: Path) -> Path | None:
    from sd35dist.checkpoint.export import ExportError, find_checkpoint

    if not ((source / COMPLETE).is_file() or (source / CHECKPOINTS).is_dir()):
        return None
    try:
        return find_checkpoint(source)
    except ExportError as err:
        raise SourceError(str(err)) from None


def _config_file(source: Path) -> Path:
    """The config.json the transformer of SOURCE is built from."""
    from sd35dist.checkpoint.layout import TRANSFORMER_CONFIG

    if not source.exists():
        raise SourceError(f"{source}: no such file or directory")
    checkpoint = _checkpoint_of(source)
    if checkpoint is not None:
        return checkpoint / TRANSFORMER_CONFIG
    if (source / "model_index.json").is_file():
        return source / "transformer" / "config.json"
    if (source / "config.json").is_file():
        return source / "config.json"
    raise SourceError(f"{source}: not a checkpoint, an output directory with {CHECKPOINTS}/, a diffusers "
                      "transformer directory (config.json) or a base model (model_index.json)")


def source_config(source: Path) -> dict:
    """The transformer's config of SOURCE, read without loading a weight; SourceError says what is wrong."""
    path = _config_file(Path(source))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"{path}: not a readable JSON config ({type(exc).__name__})") from None
    if not isinstance(config, dict) or config.get("_class_name", TRANSFORMER_CLASS) != TRANSFORMER_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise SourceError(f"{path}: the config of {found}, not of an SD3 transformer ({TRANSFORMER_CLASS})")
    return config


def base_model_of(source: Path) -> Path | None:
    """The base model directory SOURCE names: a checkpoint's recipe's model.pretrained, or SOURCE itself."""
    source = Path(source)
    checkpoint = _checkpoint_of(source)
    if checkpoint is not None:
        try:
            recipe = checkpoint_recipe(checkpoint)
        except (OSError, ValueError) as exc:  # CheckpointUnreadable and pydantic's ValidationError are ValueErrors
            raise SourceError(f"{checkpoint / RECIPE_FILE}: unreadable ({type(exc).__name__}): add --model DIR") from None
        return Path(recipe.model.pretrained) if recipe is not None else None
    return source if (source / "model_index.json").is_file() else None


def check_has_ema(source: Path) -> None:
    """SOURCE is a checkpoint that holds EMA weights (read from its metadata, no weight loaded)."""
    from sd35dist.checkpoint.inspect import open_checkpoint
    from sd35dist.checkpoint.layout import CheckpointUnreadable

    checkpoint = _checkpoint_of(Path(source))
    if checkpoint is None:
        raise SourceError(f"{source}: --ema needs a checkpoint (an export or base model holds one set of weights)")
    try:
        open_checkpoint(checkpoint, use_ema=True)
    except CheckpointUnreadable as err:
        raise SourceError(f"--ema: {err}") from None


def check_base_model(base: Path, what: str, parts: tuple[str, ...] = BASE_MODEL_PARTS) -> None:
    """The base model holds what sampling loads (`parts`: BASE_MODEL_PARTS; a sweep's prompts come from the cache)."""
    try:
        check_model_dir(base, parts)
    except ModelDirectoryIncomplete as err:
        raise SourceError(f"{what}: {err}") from None


def vae_scale_of(base: Path) -> int:
    """Pixels per latent pixel of the base model's VAE (8 for SD3)."""
    try:
        channels = json.loads((base / "vae" / "config.json").read_text())["block_out_channels"]
        return 2 ** (len(channels) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        raise SourceError(f"{base / 'vae' / 'config.json'}: not a readable VAE config") from None


def load_transformer(source: Path, *, use_ema: bool = False, dtype: torch.dtype = torch.float32) -> LoadedTransformer:
    """The transformer of SOURCE; files that cannot be loaded (truncated, not weights) are a SourceError."""
    from safetensors import SafetensorError

    try:
        return _load_transformer(source, use_ema=use_ema, dtype=dtype)
    except (OSError, SafetensorError) as exc:
        raise SourceError(f"{source}: cannot load the transformer: {' '.join(str(exc).split())}") from None


def _load_transformer(source: Path, *, use_ema: bool, dtype: torch.dtype) -> LoadedTransformer:
    from diffusers import SD3Transformer2DModel

    from sd35dist.checkpoint.export import checkpoint_state, find_checkpoint
    from sd35dist.checkpoint.layout import TRANSFORMER_CONFIG

    source = Path(source)
    if (source / COMPLETE).is_file() or (source / CHECKPOINTS).is_dir():
        checkpoint = find_checkpoint(source)
        with torch.device("meta"):
            model = SD3Transformer2DModel.from_config(json.loads((checkpoint / TRANSFORMER_CONFIG).read_text()))
        model.load_state_dict({k: v.to(dtype) for k, v in checkpoint_state(checkpoint, use_ema).items()}, assign=True)
        recipe = checkpoint_recipe(checkpoint)
        return LoadedTransformer(model.eval(), f"{checkpoint.name}{' ema' if use_ema else ''}",
                                 Path(recipe.model.pretrained) if recipe else None, recipe)
    if use_ema:
        raise SourceError(f"{source}: --ema needs a checkpoint (an export or base model holds one set of weights)")
    if (source / "model_index.json").is_file():
        model = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", dtype=dtype)
        return LoadedTransformer(model.eval(), "base model", source, None)
    if (source / "config.json").is_file():
        model = SD3Transformer2DModel.from_pretrained(source, dtype=dtype)
        return LoadedTransformer(model.eval(), source.name, None, None)
    raise SourceError(f"{source}: not a checkpoint, an output directory with {CHECKPOINTS}/, a diffusers "
                      "transformer directory (config.json) or a base model (model_index.json)")

"""Where `sd35dist sample` and `sd35dist sweep` get a transformer: a checkpoint (or an output
directory's latest), a diffusers export directory, or the base model directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from sd35dist.checkpoint.layout import CHECKPOINTS, COMPLETE, saved_recipe
from sd35dist.config.recipe import Recipe


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


def load_transformer(source: Path, *, use_ema: bool = False, dtype: torch.dtype = torch.float32) -> LoadedTransformer:
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

"""What a local SD3 diffusers directory must hold for each job, checked by file names only.

The ranks load these parts (sd35dist/models/sd3_components.py, transformer_build.py,
jobs/train.py); `sd35dist submit` looks for the same files first, without torch, so a model
directory the ranks would die on is refused as one line before anything is submitted.
"""

from __future__ import annotations

import json
from pathlib import Path

from sd35dist.config.loading import ConfigError
from sd35dist.config.recipe import Recipe, is_url

MODEL_INDEX = "model_index.json"
# subfolder -> the file that must be in it (weights are checked separately: they may be sharded);
# the rank side (models/sd3_components.py) checks the same table
REQUIRED_FILES = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "text_encoder_3": "config.json",
    "tokenizer": "tokenizer_config.json",
    "tokenizer_2": "tokenizer_config.json",
    "tokenizer_3": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
WEIGHTED = frozenset({"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"})
WEIGHT_SUFFIXES = (".safetensors", ".bin")

JOB_PARTS = {
    # The trainer builds the MMDiT from its config and weights and reads the scheduler's shift;
    # latents and embeddings come from the cache, so the VAE and text encoders are not opened.
    "train": ("transformer", "scheduler"),
    "cache": ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
}
"""Subfolders each rank-side job opens; a job not named here does not read the model."""


def job_parts(job: str, transformer_subfolder: str = "transformer") -> dict[str, tuple[str, bool]]:
    """subfolder -> (required file, holds weights) for what `job` opens (the recipe may rename the transformer's folder)."""
    parts = {}
    for part in JOB_PARTS.get(job, ()):
        folder = transformer_subfolder if part == "transformer" else part
        parts[folder] = (REQUIRED_FILES[part], part in WEIGHTED)
    return parts


def missing_in_model_dir(model_dir: Path, parts: dict[str, tuple[str, bool]]) -> str | None:
    """What the directory lacks of `parts` (model_index.json first), or None when it has them all."""
    if not model_dir.is_dir():
        return "is not a directory; expected a diffusers directory with SD3.5's layout"
    if not (model_dir / MODEL_INDEX).is_file():
        return f"has no {MODEL_INDEX}; expected a diffusers directory with SD3.5's layout"
    for folder, (required, weighted) in parts.items():
        if not (model_dir / folder).is_dir():
            return f"has no {folder}/ (SD3.5's layout has it)"
        if not (model_dir / folder / required).is_file():
            return f"{folder}/ has no {required}"
        if weighted:
            problem = _missing_weights(model_dir / folder)
            if problem:
                return f"{folder}/ {problem}"
    return None


def _missing_weights(folder: Path) -> str | None:
    for index_file in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index_file.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"has an unreadable {index_file.name}"
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            return f"lacks shard(s) {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} named in {index_file.name}"
    if not any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        return "has no weights (*.safetensors)"
    return None


def check_pretrained(recipe: Recipe, job: str, *, visible_everywhere: bool, recipe_file: str) -> str | None:
    """Refuse a `model.pretrained` that `job` cannot load; return a note when it cannot be checked here.

    `visible_everywhere`: the job runs on this host (local profile), so a path missing here is
    missing for the job too. On a cluster a path absent from the submitting host may still be
    on the nodes' shared filesystem: then say so rather than refuse.
    """
    parts = job_parts(job, recipe.model.transformer_subfolder)
    if not parts:
        return None
    where = recipe.model.pretrained
    if is_url(where):
        raise ConfigError(recipe_file, "model.pretrained",
                          "is a URL, but the ranks load the model from a local directory: copy it to shared storage")
    path = Path(where)
    if not path.exists():
        if visible_everywhere:
            raise ConfigError(recipe_file, "model.pretrained", f"{where} does not exist")
        return (f"note: model.pretrained {where} is not visible from this host, so it was not checked; "
                f"the {job} job needs {', '.join([MODEL_INDEX, *(f'{p}/' for p in parts)])} in it")
    problem = missing_in_model_dir(path, parts)
    if problem:
        raise ConfigError(recipe_file, "model.pretrained", f"{where} {problem}")
    return None

"""The training recipe: *what* to run (model, data, parallelism, optimisation, output).

Where it runs is the cluster profile's business (launcher/profile.py). Every field has a
docstring; names follow what SD3.5 fine-tuners know from SimpleTuner and the diffusers
examples. Later stages read more of these fields; the schema rejects unknown keys now so
a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from sd35dist.config.loading import StrictModel, dump_yaml, load_model

URL_SCHEMES = ("file://", "s3://", "memory://", "gs://", "az://", "http://", "https://")


class ModelSection(StrictModel):
    pretrained: str
    """Local diffusers directory of the base model (SD3.5 Large's layout: transformer/, vae/, text_encoder*/ …)."""
    transformer_subfolder: str = "transformer"
    """Subfolder of `pretrained` holding the MMDiT (config.json + sharded safetensors)."""


class DataSection(StrictModel):
    cache_url: str
    """Where the latent/text-embedding cache lives: a local path, file://… or s3://bucket/prefix."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec storage options (e.g. endpoint_url). Credentials come from the environment, never from here."""

    @pydantic.field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if any(word in key.lower() for word in ("secret", "key", "token", "password")):
                raise ValueError(
                    f"'{key}' looks like a credential: pass it through the environment "
                    "(e.g. AWS_SECRET_ACCESS_KEY listed in the profile's env.passthrough), not the recipe"
                )
        return value


class ParallelSection(StrictModel):
    strategy: Literal["fsdp2", "zero2", "zero3"] = "fsdp2"
    """How parameters, gradients and optimizer state are sharded across ranks."""
    min_gpus: int = Field(0, ge=0)
    """GPUs the recipe needs at least (memory); 0 runs anywhere, CPU included."""
    shard_degree: int | None = Field(None, ge=1)
    """Ranks one parameter shard group spans (HSDP when < world size); None = all ranks."""


class EmaSection(StrictModel):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    update_interval: int = Field(1, ge=1)
    start_step: int = Field(0, ge=0)


class TrainSection(StrictModel):
    train_batch_size: int = Field(1, ge=1)
    """Samples per GPU per micro-step."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int | None = Field(None, ge=1)
    """Optimizer steps; when None, num_train_epochs decides."""
    num_train_epochs: int | None = Field(None, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw_bf16"] = "adamw"
    """adamw: fp32 master weights and states; adamw_bf16: pure bf16 weights and states."""
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = True
    compile_blocks: bool = False
    """torch.compile each transformer block."""
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "uniform", "none"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    caption_dropout_probability: float = Field(0.0, ge=0, le=1)
    ema: EmaSection = Field(default_factory=EmaSection)
    checkpointing_steps: int = Field(400, ge=1)
    checkpoints_total_limit: int = Field(2, ge=1)
    resume: str = "latest"
    """latest | none | a checkpoint path."""


class LoggingSection(StrictModel):
    report_to: Literal["wandb", "none"] = "wandb"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    tracker_project_name: str = "sd35dist"
    tracker_run_name: str | None = None


class OutputSection(StrictModel):
    dir: str
    """Checkpoints and exports go here (local path, or a shared filesystem on a cluster)."""


class Recipe(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Short name; the Slurm job name and run directory start with it."""
    seed: int = 0
    model: ModelSection
    data: DataSection
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    output: OutputSection


RECIPE_KEYS = frozenset(Recipe.model_fields)


def load_recipe(path: Path, overrides: list[tuple[list[str], Any]] = ()) -> Recipe:  # type: ignore[assignment]
    return load_model(Recipe, path, overrides)


def is_url(text: str) -> bool:
    return "://" in text and text.split("://", 1)[0].isidentifier()


def _absolute(path_or_url: str, base: Path) -> str:
    if is_url(path_or_url):
        return path_or_url
    return str((base / os.path.expanduser(path_or_url)).resolve())


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Relative local paths → absolute against `base`, so a frozen recipe means the same anywhere."""
    return recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"pretrained": _absolute(recipe.model.pretrained, base)}),
            "data": recipe.data.model_copy(update={"cache_url": _absolute(recipe.data.cache_url, base)}),
            "output": recipe.output.model_copy(update={"dir": _absolute(recipe.output.dir, base)}),
        }
    )


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the canonical JSON form: equal recipes hash equal whatever their YAML layout."""
    canonical = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recipe_yaml(recipe: Recipe) -> str:
    return dump_yaml(recipe)

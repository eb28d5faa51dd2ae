"""The recipe's `validation:` section: which images to render while training, and how.

The prompts' text embeddings are computed by `sd35dist cache` and stored with the cache
(sd35dist/data/validation_prompts.py), so no rank ever loads the text encoders; a hash of
the prompt list in the manifest tells a recipe whose prompts changed since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import Field

from sd35dist.config.cli_args import SEED_MAX
from sd35dist.config.loading import StrictModel, YamlTuple


class ApgSection(StrictModel):
    """Adaptive projected guidance (Sadat et al. 2024), used when `guidance: apg`."""

    eta: float = Field(0.0, ge=0)
    """Weight of the update's part parallel to the conditional prediction (0: the paper's; 1, no momentum/cap: CFG)."""
    momentum: float | None = -0.5
    """Momentum of the running update (the paper uses -0.5); null: none."""
    norm_threshold: float = Field(15.0, ge=0)
    """Cap on the update's L2 norm per image (0: no cap)."""


class SkipLayerGuidanceSection(StrictModel):
    """Skip-layer guidance (SLG), as diffusers' StableDiffusion3Pipeline runs it (`skip_guidance_layers`):
    in the steps between `start` and `stop`, a third forward of the conditional prompt leaves `layers`
    out, and `scale` × (conditional − that) is added to the guided prediction. Stability AI recommends
    layers [7, 8, 9] for SD3.5 Medium. It needs classifier-free guidance (guidance_scale > 1)."""

    layers: list[int] = Field(min_length=1)
    """Indices of the transformer blocks to skip (0-based; SD3.5 Large has 38, Medium 24)."""
    scale: float = Field(2.8, ge=0)
    start: float = Field(0.01, ge=0, le=1)
    """Fraction of the steps after which SLG starts (strictly after start × steps)."""
    stop: float = Field(0.2, ge=0, le=1)
    """Fraction of the steps before which SLG ends (strictly before stop × steps)."""

    @pydantic.model_validator(mode="after")
    def _range(self) -> SkipLayerGuidanceSection:
        if any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers {self.layers}: block indices are 0 or more")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers}: each block once")
        if not self.start < self.stop:
            raise ValueError(f"start {self.start:g} must be below stop {self.stop:g}")
        return self


class ValidationSection(StrictModel):
    prompts: list[str] = Field(default_factory=list)
    """Validation prompts, inline."""
    prompts_file: str | None = None
    """Or a text file with one prompt per line (blank lines skipped); relative to the recipe's directory."""
    negative_prompt: str = ""
    """The unconditional prompt of guidance."""
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] = Field(default_factory=lambda: [0])
    """One image per (prompt, seed, resolution); each has its own generator (torch.Generator: 0 … 2^64-1)."""
    every_n_steps: int = Field(0, ge=0)
    """Render every this many optimizer steps, and after the last (0: never during training)."""
    at_start: bool = False
    """Also render before the first optimizer step (the base model); a resumed run does not render it again."""
    num_inference_steps: int = Field(28, ge=1)
    guidance_scale: float = Field(4.0, ge=1)
    guidance: Literal["cfg", "apg"] = "cfg"
    """cfg: classic classifier-free guidance; apg: adaptive projected guidance (apg: section)."""
    apg: ApgSection = Field(default_factory=ApgSection)
    skip_layer_guidance: SkipLayerGuidanceSection | None = None
    """Skip-layer guidance on top of cfg or apg (null: none); see SkipLayerGuidanceSection."""
    resolutions: list[Annotated[tuple[int, int], YamlTuple]] = Field(default_factory=lambda: [(1024, 1024)])
    """[width, height] of the images; each a multiple of 16."""
    weights: Literal["model", "ema", "both"] = "model"
    """Render with the trained weights, the EMA weights, or both side by side (ema needs train.ema.enabled)."""

    @pydantic.field_validator("resolutions")
    @classmethod
    def _sizes(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not value:
            raise ValueError("at least one resolution is needed")
        for width, height in value:
            if width <= 0 or height <= 0 or width % 16 or height % 16:
                raise ValueError(f"{width}x{height}: sides must be positive multiples of 16")
        return value

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> ValidationSection:
        if self.prompts and self.prompts_file:
            raise ValueError("give prompts or prompts_file, not both")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is needed")
        if self.skip_layer_guidance is not None and self.guidance_scale == 1.0:
            raise ValueError("skip_layer_guidance needs guidance_scale > 1: it only acts with classifier-free "
                             "guidance (as in diffusers' pipeline)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.prompts or self.prompts_file)

    @property
    def renders_during_training(self) -> bool:
        return self.enabled and (self.every_n_steps > 0 or self.at_start)

    def prompt_list(self) -> list[str]:
        """The prompts, read from `prompts_file` when one is named (PromptsFileError says why it cannot be)."""
        if self.prompts_file is None:
            return list(self.prompts)
        return read_prompts_file(Path(self.prompts_file))


class PromptsFileError(ValueError):
    """A prompts file that is missing, unreadable, not UTF-8 or without a prompt; the message says which."""


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line of a UTF-8 text file, blank lines skipped; at least one prompt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PromptsFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise PromptsFileError(f"{path} is a directory, not a text file of prompts") from None
    except OSError as exc:
        raise PromptsFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PromptsFileError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}): "
                               "save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsFileError(f"{path} holds no prompt: write one prompt per line")
    return prompts

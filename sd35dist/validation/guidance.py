"""Classifier-free guidance and adaptive projected guidance (APG) for a velocity-predicting model.

APG (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in
Diffusion Models") splits the guidance update `cond - uncond` into a part parallel to the
conditional prediction and a part orthogonal to it, keeps the orthogonal part and scales the
parallel one by `eta`; before that the update runs through a momentum buffer and its norm is
capped at `norm_threshold`. The maths is diffusers' own (`diffusers.guiders.
adaptive_projected_guidance.normalized_guidance` and its `MomentumBuffer`); this module only
applies it where the paper does: to the denoised prediction x0, not to SD3's velocity.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class GuidanceSettings:
    kind: Literal["cfg", "apg"] = "cfg"
    scale: float = 4.0
    """Guidance scale; 1.0 means the conditional prediction alone."""
    eta: float = 1.0
    """APG: weight of the update's part parallel to the conditional prediction (0 drops it: less saturation)."""
    momentum: float | None = None
    """APG: momentum of the running update (the paper uses a negative one, e.g. -0.5); None: no momentum."""
    norm_threshold: float = 0.0
    """APG: the update's L2 norm per image is capped at this (0: no cap)."""
    skip_layers: tuple[int, ...] = ()
    """Skip-layer guidance (SD3.5's SLG, diffusers' `skip_guidance_layers`): transformer blocks left out of
    a third, conditional forward; empty: none. Applied only with classifier-free guidance, as in diffusers."""
    skip_scale: float = 2.8
    """SLG: weight of (conditional − skipped-layers prediction) added to the guided prediction."""
    skip_start: float = 0.01
    """SLG: applied at steps i with start·steps < i < stop·steps (the pipeline's condition)."""
    skip_stop: float = 0.2


class Guidance:
    """Combines the conditional and unconditional velocity of one sampling run (holds APG's momentum)."""

    def __init__(self, settings: GuidanceSettings) -> None:
        self.settings = settings
        self._momentum = None
        if settings.kind == "apg" and settings.momentum is not None:
            from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # see _apg

            self._momentum = MomentumBuffer(settings.momentum)

    @property
    def needs_uncond(self) -> bool:
        return self.settings.scale != 1.0

    def skips_layers_at(self, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` runs the skip-layer forward (strict bounds, as StableDiffusion3Pipeline)."""
        s = self.settings
        return bool(s.skip_layers) and self.needs_uncond and steps * s.skip_start < step < steps * s.skip_stop

    def with_skipped_layers(self, guided: torch.Tensor, v_cond: torch.Tensor, v_skip: torch.Tensor) -> torch.Tensor:
        return guided + (v_cond - v_skip) * self.settings.skip_scale

    def __call__(self, v_cond: torch.Tensor, v_uncond: torch.Tensor | None, latents: torch.Tensor,
                 sigma: float) -> torch.Tensor:
        s = self.settings
        if v_uncond is None or not self.needs_uncond:
            return v_cond
        if s.kind == "cfg":
            return v_uncond + s.scale * (v_cond - v_uncond)
        # Flow matching: x_t = (1 - sigma) x0 + sigma * noise and v = noise - x0, so x0 = x_t - sigma * v.
        x0_cond, x0_uncond = latents - sigma * v_cond, latents - sigma * v_uncond
        x0 = _apg(x0_cond, x0_uncond, s.scale, self._momentum, s.eta, s.norm_threshold)
        return (latents - x0) / sigma


def _apg(*args):
    # Imported here, not at the top: diffusers.guiders pulls in peft and transformers (~3 s of every
    # training rank's start), and only APG validation uses it.
    from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

    return normalized_guidance(*args)

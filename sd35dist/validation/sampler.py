"""SD3's flow-matching Euler sampler around any transformer forward, as StableDiffusion3Pipeline runs it.

The scheduler is diffusers' own (FlowMatchEulerDiscreteScheduler from the model's scheduler
config) and the noise, the [uncond, cond] batch, the timestep and the VAE post-processing
follow the pipeline, so an image here equals the pipeline's for the same transformer,
embeddings and seed (a test checks pixel equality). The forward is a callable, so the same
loop drives a plain module (`sd35dist sample`) or a sharded one (FSDP2, ZeRO-3) while training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sd35dist.validation.guidance import Guidance, GuidanceSettings

Forward = Callable[..., torch.Tensor]
"""forward(hidden_states=, timestep=, encoder_hidden_states=, pooled_projections=[, skip_layers=]) -> velocity."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleSettings:
    steps: int = 28
    guidance: GuidanceSettings = dataclasses.field(default_factory=GuidanceSettings)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentShape:
    channels: int
    vae_scale: int
    """Pixels per latent side (8 for SD3's VAE)."""

    def of(self, width: int, height: int) -> tuple[int, int, int, int]:
        return (1, self.channels, height // self.vae_scale, width // self.vae_scale)


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The pipeline's starting latents for `generator=torch.Generator().manual_seed(seed)` (own generator:
    validation never draws from training's random streams)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def make_scheduler(scheduler_config: dict[str, Any], steps: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError("scheduler use_dynamic_shifting is not supported (SD3.5 does not use it)")
    scheduler.set_timesteps(steps, device="cpu")
    return scheduler


@torch.no_grad()
def sample_latents(forward: Forward, scheduler_config: dict[str, Any], settings: SampleSettings, *,
                   noise: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                   negative_embeds: torch.Tensor, negative_pooled: torch.Tensor,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Denoise one image's latents ([1, C, h, w]) from `noise`; runs exactly `settings.steps` forwards."""
    scheduler = make_scheduler(scheduler_config, settings.steps)
    guidance = Guidance(settings.guidance)
    latents = noise.to(device)
    if guidance.needs_uncond:
        embeds = torch.cat([negative_embeds, prompt_embeds]).to(device)
        pooled_in = torch.cat([negative_pooled, pooled]).to(device)
    else:
        embeds, pooled_in = prompt_embeds.to(device), pooled.to(device)
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents] * 2) if guidance.needs_uncond else latents
        velocity = forward(hidden_states=model_input, timestep=t.expand(model_input.shape[0]).to(device),
                           encoder_hidden_states=embeds, pooled_projections=pooled_in).to(latents.dtype)
        if guidance.needs_uncond:
            v_uncond, v_cond = velocity.chunk(2)
            velocity = guidance(v_cond, v_uncond, latents, float(scheduler.sigmas[i]))
            if guidance.skips_layers_at(i, steps):
                # Every rank reaches this at the same steps (same settings), so sharded forwards stay in step.
                v_skip = forward(hidden_states=latents, timestep=t.expand(latents.shape[0]).to(device),
                                 encoder_hidden_states=prompt_embeds.to(device), pooled_projections=pooled.to(device),
                                 skip_layers=list(guidance.settings.skip_layers)).to(latents.dtype)
                velocity = guidance.with_skipped_layers(velocity, v_cond, v_skip)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode_image(vae, latents: torch.Tensor) -> np.ndarray:
    """Latents -> one RGB uint8 image [H, W, 3], with the pipeline's scaling and post-processing."""
    from diffusers.image_processor import VaeImageProcessor

    config = vae.config
    latents = latents.to(vae.device, vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
    image = vae.decode(latents, return_dict=False)[0]
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(config.block_out_channels) - 1))
    return np.asarray(processor.postprocess(image, output_type="pil")[0])


def latent_shape_of(transformer_config: Any, vae) -> LatentShape:
    return LatentShape(channels=int(transformer_config.in_channels),
                       vae_scale=2 ** (len(vae.config.block_out_channels) - 1))

"""Images -> SD3 VAE latent distributions, and the train-time sampling and scaling of latents.

Why the cache stores the distribution (mean, std) and not latents: diffusers'
train_dreambooth_sd3 example calls `vae.encode(pixels).latent_dist.sample()` afresh at every
step, so each visit of an image sees a different latent. Storing one sample would freeze that
noise for the whole run. Storing mean and std lets the trainer redraw
`mean + std * randn` with a seeded generator: the same distribution the example samples from,
reproducible across restarts, with the VAE never loaded during training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for pixels [B, 3, H, W] in [-1, 1].

    Both are [B, latent_channels, H / 8, W / 8] in the VAE's dtype, on its device.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {list(pixels.shape)}")
    latent_dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    # Both are views into one [B, 2C, h, w] tensor; contiguous copies can be written to shards.
    return latent_dist.mean.contiguous(), latent_dist.std.contiguous()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from N(mean, std^2), bit-identical to diffusers' `latent_dist.sample(generator)`."""
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def scale_latents(latents: torch.Tensor, vae_config: Mapping[str, Any]) -> torch.Tensor:
    """(latents - shift_factor) * scaling_factor: what the SD3 transformer sees (as in the SD3 example)."""
    return (latents - vae_config["shift_factor"]) * vae_config["scaling_factor"]

"""SD3 rectified-flow matching, exactly as diffusers' SD3 DreamBooth example trains it.

One training step's maths, in the example's order:

    u         = density(weighting_scheme, batch)                 # in [0, 1)
    indices   = (u * num_train_timesteps).long()
    timesteps = schedule.timesteps[indices]                      # what the transformer is fed
    sigmas    = schedule.sigmas[indices]                         # shifted like the scheduler
    noisy     = (1 - sigma) * x0 + sigma * noise
    target    = noise - x0                                       # precondition_outputs off
    weighting = loss_weighting(weighting_scheme, sigmas)
    loss      = mean_batch( mean_non_batch( weighting * (pred - target) ** 2 ) )

Every draw takes an explicit `torch.Generator`, so a rank's stream of timesteps is a
function of its seed alone (resume gives the same draws, no global RNG is touched).
The functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

WeightingScheme = Literal["logit_normal", "mode", "cosmap", "uniform", "none"]
WEIGHTING_SCHEMES: tuple[str, ...] = ("logit_normal", "mode", "cosmap", "uniform", "none")


def _check_scheme(scheme: str) -> None:
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme {scheme!r} is not one of {', '.join(WEIGHTING_SCHEMES)}")


def sample_timestep_density(
    scheme: WeightingScheme,
    batch: int,
    generator: torch.Generator,
    *,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
) -> torch.Tensor:
    """Draw `batch` values u in [0, 1] (float32) whose density is the weighting scheme's.

    logit_normal: sigmoid(N(logit_mean, logit_std)); mode: the SD3 paper's mode sampling
    with `mode_scale`; cosmap, uniform, none: U[0, 1). Same draws, value for value, as
    diffusers' `compute_density_for_timestep_sampling` given the same generator state.
    """
    _check_scheme(scheme)
    device = generator.device
    if scheme == "logit_normal":
        normal = torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device=device, generator=generator)
        return torch.nn.functional.sigmoid(normal)
    uniform = torch.rand(size=(batch,), device=device, generator=generator)
    if scheme == "mode":
        return 1 - uniform - mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    return uniform


def sample_timestep_indices(
    scheme: WeightingScheme,
    batch: int,
    generator: torch.Generator,
    *,
    logit_mean: float,
    logit_std: float,
    mode_scale: float,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Indices (int64, shape (batch,)) into a `FlowMatchSchedule`'s sigmas and timesteps.

    `(u * num_train_timesteps).long()` as the example does, clamped to the table: u can
    reach 1.0 (sigmoid saturating in float32, or mode sampling at u = 0), where the
    example would index one past the end.
    """
    density = sample_timestep_density(
        scheme, batch, generator, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
    )
    indices = (density * num_train_timesteps).long()
    return indices.clamp_(0, num_train_timesteps - 1)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The training table of FlowMatchEulerDiscreteScheduler: sigma and timestep per index.

    Index 0 is the noisiest (sigma 1, timestep num_train_timesteps); the last index is
    sigma = shifted(1 / num_train_timesteps). Built the way the scheduler's `__init__`
    builds it, so the values are bit-identical to a fresh scheduler's `.sigmas`/`.timesteps`.
    """

    num_train_timesteps: int
    shift: float
    sigmas: torch.Tensor
    """float32, shape (num_train_timesteps,), decreasing from 1.0."""
    timesteps: torch.Tensor
    """float32, sigmas * num_train_timesteps: the value the transformer is conditioned on."""

    @classmethod
    def build(
        cls, num_train_timesteps: int = 1000, shift: float = 1.0, *, dynamic_shifting: bool = False
    ) -> FlowMatchSchedule:
        """The table for these scheduler settings (SD3.5 Large ships num_train_timesteps 1000, shift 3.0).

        With dynamic shifting the scheduler leaves its training table unshifted (it shifts
        per resolution at inference), and so does this.
        """
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        # numpy's float32 linspace, as the scheduler uses, keeps the values bit-identical.
        ladder = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = torch.from_numpy(ladder).to(dtype=torch.float32) / num_train_timesteps
        if not dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        return cls(
            num_train_timesteps=num_train_timesteps,
            shift=float(shift),
            sigmas=sigmas,
            timesteps=sigmas * num_train_timesteps,
        )

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], *, shift: float | None = None) -> FlowMatchSchedule:
        """The table for a scheduler_config.json's values (a model's scheduler/ subfolder).

        `shift` (the recipe's train.flow_shift) replaces the config's: a static shift for every
        resolution, as SimpleTuner's flow_schedule_shift applies it, so dynamic shifting is off then.
        """
        return cls.build(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            shift=float(config.get("shift", 1.0)) if shift is None else float(shift),
            dynamic_shifting=bool(config.get("use_dynamic_shifting", False)) and shift is None,
        )

    def sigmas_at(self, indices: torch.Tensor, *, ndim: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sigmas for `indices`, shaped (batch, 1, …, 1) with `ndim` dims to broadcast over latents."""
        sigmas = self.sigmas.to(indices.device)[indices].to(dtype)
        return sigmas.reshape(sigmas.shape + (1,) * (ndim - sigmas.ndim))

    def timesteps_at(self, indices: torch.Tensor) -> torch.Tensor:
        """Timesteps (float32, shape (batch,)) for `indices`: what the transformer's `timestep` gets."""
        return self.timesteps.to(indices.device)[indices]


def _broadcast_like(per_sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if per_sample.ndim == 1 and x.ndim > 1:
        per_sample = per_sample.reshape(per_sample.shape + (1,) * (x.ndim - 1))
    return per_sample.to(device=x.device)


def noisy_input_and_target(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer's input x_t = (1 − σ)·x0 + σ·ε and its regression target ε − x0.

    `sigmas` is (batch,) or already broadcastable; it is cast to x0's dtype first, as the
    example does, so bf16 latents give the example's bf16 arithmetic.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    sigmas = _broadcast_like(sigmas, x0).to(x0.dtype)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    return noisy, noise - x0


def loss_weighting(scheme: WeightingScheme, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights, the shape of `sigmas`: 2 / (π (1 − 2σ + 2σ²)) for cosmap, else 1.

    The same values as diffusers' `compute_loss_weighting_for_sd3`.
    """
    _check_scheme(scheme)
    if scheme == "cosmap":
        bottom = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bottom)
    return torch.ones_like(sigmas)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
    """float32 loss of each sample, shape (batch,): mean over non-batch dims of w·(pred − target)²."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    weighting = _broadcast_like(weighting, target).float()
    squared = weighting * (pred.float() - target.float()) ** 2
    return squared.reshape(target.shape[0], -1).mean(dim=1)


def flow_matching_loss_sum_and_count(
    pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """(sum of per-sample losses as a float32 scalar, number of samples) for all-reducing.

    Summing both across ranks and dividing gives the mean over every sample of the step,
    whatever each rank's batch size; on one rank that is the example's `loss.mean()`.
    """
    losses = per_sample_loss(pred, target, weighting)
    return losses.sum(), losses.shape[0]

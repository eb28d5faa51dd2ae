"""Learning-rate schedules as pure functions of the optimizer step, matching diffusers.

`learning_rate_at(step, …)` is the learning rate the optimizer uses for its step number
`step` (0-based), the value a `torch.optim` optimizer carries after `step` calls of
`scheduler.step()` on diffusers' `get_scheduler(...)`. A pure function means resume needs
no scheduler state: the step counter in the checkpoint is enough.

Two behaviours of diffusers' schedules kept on purpose, because fine-tuners' recipes were
tuned with them:
- with warmup, the very first optimizer step runs at lr 0 (factor step / warmup_steps);
- polynomial decays to `lr_end` (1e-7, which `get_scheduler` never overrides) and stays
  there after `total_steps`; linear and cosine reach 0 at `total_steps`.

The diffusers examples pass `lr_warmup_steps * num_processes` and
`max_train_steps * num_processes` because accelerate steps their scheduler once per
process per optimizer step; counted in optimizer steps, as here, that is the same schedule.
"""

from __future__ import annotations

import math
from typing import Literal

LrScheduler = Literal["constant", "linear", "cosine", "polynomial"]
LR_SCHEDULERS: tuple[str, ...] = ("constant", "linear", "cosine", "polynomial")


def learning_rate_factor_at(
    step: int,
    *,
    base_lr: float,
    scheduler: LrScheduler,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    lr_end: float = 1e-7,
) -> float:
    """The multiplier of `base_lr` at optimizer step `step`: diffusers' `lr_lambda(step)`.

    Use it as a `torch.optim.lr_scheduler.LambdaLR` lambda to get the very same floats as
    diffusers (LambdaLR multiplies the factor by the base lr). Arguments as for
    `learning_rate_at`.
    """
    _check(
        step, base_lr=base_lr, scheduler=scheduler, warmup_steps=warmup_steps, total_steps=total_steps, lr_end=lr_end
    )
    if scheduler == "constant":
        if step < warmup_steps:
            return float(step) / float(max(1.0, warmup_steps))
        return 1.0
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if scheduler == "linear":
        remaining = float(total_steps - step) / float(max(1, total_steps - warmup_steps))
        return max(0.0, remaining)
    if scheduler == "cosine":
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        # One half-period from base_lr down to 0: get_scheduler leaves num_cycles at 0.5.
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if step > total_steps:
        return lr_end / base_lr
    lr_range = base_lr - lr_end
    decay_steps = total_steps - warmup_steps
    pct_remaining = 1 - (step - warmup_steps) / decay_steps
    decay = lr_range * pct_remaining**power + lr_end
    return decay / base_lr


def learning_rate_at(
    step: int,
    *,
    base_lr: float,
    scheduler: LrScheduler,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    lr_end: float = 1e-7,
) -> float:
    """The learning rate of optimizer step `step` (0-based), as diffusers' `get_scheduler` gives it.

    scheduler: constant (constant_with_warmup when warmup_steps > 0), linear, cosine
    (half-cosine to 0), polynomial (to `lr_end` with exponent `power`).
    warmup_steps: steps of linear ramp from 0; total_steps: max_train_steps.
    Raises ValueError on an unknown scheduler, a negative step, or a polynomial
    schedule whose base_lr is not above lr_end (diffusers refuses it too).
    """
    factor = learning_rate_factor_at(
        step,
        base_lr=base_lr,
        scheduler=scheduler,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        power=power,
        lr_end=lr_end,
    )
    return base_lr * factor


def _check(step: int, *, base_lr: float, scheduler: str, warmup_steps: int, total_steps: int, lr_end: float) -> None:
    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler {scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"lr_warmup_steps must be >= 0, got {warmup_steps}")
    if base_lr <= 0:
        raise ValueError(f"learning_rate must be positive, got {base_lr}")
    if scheduler == "polynomial":
        if not base_lr > lr_end:
            raise ValueError(f"polynomial schedule: lr_end ({lr_end}) must be smaller than learning_rate ({base_lr})")
        if total_steps <= warmup_steps:
            raise ValueError(
                f"polynomial schedule: max_train_steps ({total_steps}) must exceed lr_warmup_steps ({warmup_steps})"
            )

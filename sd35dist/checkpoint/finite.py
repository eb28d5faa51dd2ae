"""Non-finite numbers end a run: the error every rank raises alike, and the checks that find them.

A NaN or inf loss, gradient norm or weight never cures itself: every later step and every
restart from the same checkpoint meets it again. So it is a mistake (a learning rate too large,
a poisoned sample), reported in one line naming the step and exit status 2, which torchrun does
not restart (jobs/rank_failure.py) — and a checkpoint holding such weights is never published.
All ranks decide alike: the loss and the gradient norm are global, and the weights' verdict is
all-reduced before the checkpoint manager writes anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class NonFiniteTraining(ValueError):
    """The loss, the gradients or the weights hold NaN or inf; the message names the step."""


def finite_non_negative(value: float | None) -> bool:
    """A loss or a gradient norm that training can go on from (DeepSpeed reports a broken norm as -1)."""
    return value is not None and math.isfinite(value) and value >= 0


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of these tensors (this rank's shards of DTensors) is finite; one device sync."""
    flags = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def loss_message(step: int, what: str, value: float, latest: str | None) -> str:
    """The one line for a non-finite loss or gradient norm at `step`."""
    return (f"step {step}: the {what} is {value:g}, not a finite number: training stops and nothing of step {step} "
            f"is saved (latest checkpoint: {latest or 'none'}); lower train.learning_rate or check the data")


def weights_message(step: int, latest: str | None) -> str:
    """The one line for weights that went non-finite before the checkpoint of `step`."""
    return (f"step {step}: the weights hold NaN or inf, so this checkpoint is not published (latest stays "
            f"{latest or 'none'}): training stops; lower train.learning_rate or check the data")

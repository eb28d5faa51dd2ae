"""How many optimizer steps a run takes: epochs, batches and accumulation, as pure maths.

Fine-tuners size runs with the SD3.5 tutorial's formula (per GPU, one concept or many):

    max_steps = (Σ_i images_i × repeats_i / batch) × epochs

and, for several GPUs with gradient accumulation, divide by GPUs × accumulation for the
global view. The tutorial's example: 476 images × 5 repeats / batch 6 = 396.7 steps per
epoch, × 30 epochs ≈ 11,900 steps.

`plan_steps` counts like the diffusers examples (a DataLoader that keeps its last short
batch, and `ceil(len(dataloader) / gradient_accumulation_steps)` updates per epoch), so
a short last batch and a short last accumulation window each still count as a step.
For the example that is 397 steps per epoch and 11,910 for 30 epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StepPlan:
    """The run's length in optimizer steps and epochs, and the batch each step sees."""

    global_batch: int
    """Samples per optimizer step across all ranks: train_batch_size × world_size × accumulation."""
    micro_steps_per_epoch: int
    """Forward/backward passes each rank makes per epoch (the last may be short)."""
    optimizer_steps_per_epoch: int
    """Optimizer updates per epoch (the last may accumulate fewer micro-steps)."""
    max_train_steps: int
    """Optimizer updates of the whole run; the LR schedule's total_steps."""
    num_train_epochs: int
    """Epochs the run starts (the last one may stop part-way at max_train_steps)."""
    samples_per_epoch: int
    """Σ images × repeats over the datasets: samples one epoch shows across all ranks."""


def count_epoch_samples(images_and_repeats: Iterable[tuple[int, int]]) -> int:
    """Σ images_i × repeats_i: the samples of one epoch, from (images, repeats) per dataset."""
    total = 0
    for images, repeats in images_and_repeats:
        if images < 0 or repeats < 1:
            raise ValueError(f"a dataset needs images >= 0 and repeats >= 1, got images={images}, repeats={repeats}")
        total += images * repeats
    return total


def tutorial_max_steps(
    samples_per_epoch: int,
    *,
    train_batch_size: int,
    num_train_epochs: int,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
) -> float:
    """The tutorial's real-valued estimate: samples / batch × epochs ÷ (GPUs × accumulation).

    Unrounded, to compare with a user's hand calculation; `plan_steps` gives the count a
    run really takes.
    """
    per_gpu = samples_per_epoch / train_batch_size * num_train_epochs
    return per_gpu / (world_size * gradient_accumulation_steps)


def plan_steps(
    samples_per_epoch: int,
    *,
    world_size: int,
    train_batch_size: int,
    gradient_accumulation_steps: int,
    max_train_steps: int | None,
    num_train_epochs: int | None,
) -> StepPlan:
    """Steps per epoch and in total for a run, counted the way the diffusers examples count.

    micro-steps per epoch = ceil(samples_per_epoch / (train_batch_size × world_size)): each
    rank takes one batch per micro-step and the last, short batch still runs.
    optimizer steps per epoch = ceil(micro-steps / gradient_accumulation_steps): a final
    window of fewer than gradient_accumulation_steps micro-steps still ends in an optimizer
    step (accelerate syncs at the end of the data), so its update sees fewer samples.
    max_train_steps, when set, wins (num_train_epochs then becomes the epochs needed to
    reach it, rounded up); otherwise max_train_steps = num_train_epochs × steps per epoch.

    Raises ValueError when neither is set, when the epoch has no samples, or when a size
    is not positive.
    """
    for name, value in (
        ("world_size", world_size),
        ("train.train_batch_size", train_batch_size),
        ("train.gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if samples_per_epoch <= 0:
        raise ValueError(
            f"the epoch is empty ({samples_per_epoch} samples): check data.datasets and the cache manifest"
        )
    if max_train_steps is None and num_train_epochs is None:
        raise ValueError("set train.max_train_steps or train.num_train_epochs in the recipe: neither is set")
    if max_train_steps is not None and max_train_steps < 1:
        raise ValueError(f"train.max_train_steps must be at least 1, got {max_train_steps}")
    if num_train_epochs is not None and num_train_epochs < 1:
        raise ValueError(f"train.num_train_epochs must be at least 1, got {num_train_epochs}")

    micro_steps_per_epoch = math.ceil(samples_per_epoch / (train_batch_size * world_size))
    optimizer_steps_per_epoch = math.ceil(micro_steps_per_epoch / gradient_accumulation_steps)
    if max_train_steps is None:
        assert num_train_epochs is not None
        max_train_steps = num_train_epochs * optimizer_steps_per_epoch
    else:
        num_train_epochs = math.ceil(max_train_steps / optimizer_steps_per_epoch)
    return StepPlan(
        global_batch=train_batch_size * world_size * gradient_accumulation_steps,
        micro_steps_per_epoch=micro_steps_per_epoch,
        optimizer_steps_per_epoch=optimizer_steps_per_epoch,
        max_train_steps=max_train_steps,
        num_train_epochs=num_train_epochs,
        samples_per_epoch=samples_per_epoch,
    )


def format_step_plan(plan: StepPlan) -> str:
    """A few lines for the user: what an epoch is, how big a step is, how long the run is."""
    epochs = plan.max_train_steps / plan.optimizer_steps_per_epoch
    partial_note = "" if epochs == plan.num_train_epochs else f" (the last stops part-way: {epochs:.2f} epochs in all)"
    lines = [
        f"samples per epoch   {plan.samples_per_epoch:,}",
        f"global batch        {plan.global_batch:,} samples per optimizer step",
        (
            f"steps per epoch     {plan.optimizer_steps_per_epoch:,} optimizer steps"
            f" ({plan.micro_steps_per_epoch:,} micro-steps per rank)"
        ),
        f"total steps         {plan.max_train_steps:,}",
        f"epochs              {plan.num_train_epochs:,}{partial_note}",
    ]
    return "\n".join(lines)

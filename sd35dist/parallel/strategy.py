"""The one small interface the training loop calls, whatever shards the model, and the registry
of the classes that implement it.

`TrainingStrategy` owns the model, its optimizer and its EMA: forward, backward, step, and
its part of a checkpoint (save, save_async where it can, load), written and read through the
format modules of sd35dist/checkpoint/ (fsdp2_files, zero_files), which also read it offline
for export and inspection (checkpoint/weights.py). The loop never asks which strategy it has;
training finds the class in `STRATEGIES` by the name the recipe records.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import nn

from sd35dist.config.recipe import Recipe
from sd35dist.parallel.ema import ShardedEMA
from sd35dist.parallel.fsdp2 import FSDP2Strategy
from sd35dist.parallel.process_group import World
from sd35dist.parallel.zero import ZeroStrategy


class TrainingStrategy(Protocol):
    model: nn.Module
    ema: ShardedEMA | None
    supports_async: ClassVar[bool]
    """Whether `save_async` can write in the background; when not, the checkpoint manager saves synchronously."""

    def __init__(self, recipe: Recipe, world: World, recipe_file: str = "recipe") -> None: ...
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, learning_rate: float, max_grad_norm: float) -> float: ...
    def update_ema(self, decay: float) -> None: ...
    def weights_finite(self) -> bool:
        """Whether this rank's part of the trained weights and EMA is free of NaN and inf (checked before a save)."""
        ...
    def save(self, directory: Path) -> None: ...
    def save_async(self, directory: Path) -> Future: ...
    def load(self, directory: Path) -> None: ...
    def full_state_dict(self, use_ema: bool = False) -> dict[str, torch.Tensor]: ...


STRATEGIES: dict[str, type[TrainingStrategy]] = {
    "fsdp2": FSDP2Strategy,
    "zero2": ZeroStrategy,
    "zero3": ZeroStrategy,
}
"""`parallel.strategy` (and the `strategy` a checkpoint records) → the class that runs it."""


def make_strategy(recipe: Recipe, world: World, recipe_file: str = "recipe") -> TrainingStrategy:
    # The recipe's schema admits only the names above.
    return STRATEGIES[recipe.parallel.strategy](recipe, world, recipe_file)

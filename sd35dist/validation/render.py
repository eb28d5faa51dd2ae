"""Every rank renders: (prompt, seed, resolution) pairs split over the ranks, images gathered to rank 0.

A sharded transformer (FSDP2, ZeRO-3) gathers each block's weights inside its forward, so
every rank must run the same number of forwards. Pairs go round-robin; in the last round a
rank with no pair left denoises a placeholder (the smallest latent, never decoded) with the
same number of steps, so the collectives line up and nothing hangs whatever the pair count.
Each rank decodes its own latents with the VAE; rank 0 receives the images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sd35dist.data.validation_prompts import PromptEmbeddings
from sd35dist.runtime.job_env import JobEnvironment
from sd35dist.validation.sampler import (
    Forward,
    LatentShape,
    SampleSettings,
    decode_image,
    initial_noise,
    sample_latents,
)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One image: a row (prompt) and a column (seed x resolution [x weights]) of the grid."""

    prompt: int
    seed: int
    width: int
    height: int

    @property
    def column_label(self) -> str:
        return f"seed {self.seed} {self.width}x{self.height}"

    @property
    def file_stem(self) -> str:
        return f"p{self.prompt:02d}-seed{self.seed}-{self.width}x{self.height}"


def validation_pairs(prompt_count: int, seeds: list[int], resolutions: list[tuple[int, int]]) -> list[Pair]:
    return [Pair(p, seed, w, h) for p in range(prompt_count) for seed in seeds for (w, h) in resolutions]


def rank_rounds(pair_count: int, rank: int, world_size: int) -> list[int | None]:
    """Pair indices this rank renders, one per round; None: a placeholder round (every rank runs as many)."""
    rounds = math.ceil(pair_count / world_size)
    return [i if (i := r * world_size + rank) < pair_count else None for r in range(rounds)]


@dataclasses.dataclass(frozen=True)
class Renderer:
    """What rendering needs besides the pairs: the forward, the VAE, the scheduler and where it runs."""

    forward: Forward
    vae: Any
    scheduler_config: dict[str, Any]
    latent_shape: LatentShape
    device: torch.device
    rank: int = 0
    world_size: int = 1

    def _latents(self, embeddings: PromptEmbeddings, prompt: int, noise: torch.Tensor,
                 settings: SampleSettings) -> torch.Tensor:
        return sample_latents(
            self.forward, self.scheduler_config, settings, noise=noise,
            prompt_embeds=embeddings.prompt_embeds[prompt : prompt + 1],
            pooled=embeddings.pooled_prompt_embeds[prompt : prompt + 1],
            negative_embeds=embeddings.negative_prompt_embeds, negative_pooled=embeddings.negative_pooled_prompt_embeds,
            device=self.device)

    def render(self, pairs: list[Pair], embeddings: PromptEmbeddings, settings: SampleSettings) -> dict[int, np.ndarray]:
        """All ranks call this together; rank 0 gets {pair index: RGB uint8 image}, the others {}."""
        mine: list[tuple[int, np.ndarray]] = []
        for index in rank_rounds(len(pairs), self.rank, self.world_size):
            if index is None:
                placeholder = torch.zeros((1, self.latent_shape.channels, 2, 2))
                self._latents(embeddings, 0, placeholder, settings)
                continue
            pair = pairs[index]
            noise = initial_noise(pair.seed, self.latent_shape.of(pair.width, pair.height))
            latents = self._latents(embeddings, pair.prompt, noise, settings)
            mine.append((index, decode_image(self.vae, latents)))
        if self.world_size == 1:
            return dict(mine)
        gathered: list[Any] = [None] * self.world_size if self.rank == 0 else None  # type: ignore[assignment]
        dist.gather_object(mine, gathered, dst=0)
        return {index: image for part in (gathered or []) for index, image in part}


RENDER_COLLECTIVE_TIMEOUT_S = 3600
"""A rank waits this long for the others' images: a round at SD3.5 Large size takes minutes."""


@contextlib.contextmanager
def launched_ranks() -> Iterator[Any]:
    """The process group when torchrun started this command on several ranks (None in one process);
    every rank renders its share, and all leave together (gloo can abort a rank whose peer has gone)."""
    if JobEnvironment.read().world_size <= 1:
        yield None
        return
    from sd35dist.parallel.process_group import destroy, init_process_group_from_env

    world = init_process_group_from_env(RENDER_COLLECTIVE_TIMEOUT_S)
    try:
        yield world
        dist.barrier()
    finally:
        destroy()
